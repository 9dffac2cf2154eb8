# Shortcuts; each target is one documented command.
PY := .venv/bin/python

.PHONY: setup main test coverage-html lab fleet-up fleet-down bench notebooks agent

setup:            ## a virtualenv with everything, and the system packages the tests need
	bash scripts/setup.sh

main: setup       ## the main job: local fleet + the quickstart runbook, executed into out/
	$(PY) scripts/quickstart.py

test: setup       ## ruff, mypy and the tests, under coverage (the report and its floor at the end)
	bash scripts/test.sh

coverage-html:    ## the last test run's coverage as HTML, line by line: out/coverage/html/index.html
	.venv/bin/coverage html -d out/coverage/html

fleet-up:         ## start the local fleet (state/fleet) and leave it running
	.venv/bin/zy fleet up

fleet-down:       ## stop it
	.venv/bin/zy fleet down

lab: fleet-up     ## JupyterLab on notebooks/, connected to the local fleet
	ZY_CONFIG=$(CURDIR)/state/fleet/master/client.toml .venv/bin/jupyter lab --notebook-dir=notebooks

notebooks:        ## rewrite notebooks/*.ipynb from notebooks/build.py
	$(PY) notebooks/build.py

agent: setup      ## the zero-dependency agent: dist/zy-agent (one-file) and dist/zy-agent.pyz (zipapp)
	$(PY) scripts/build_agent.py --out dist

bench:            ## fan-out benchmark
	$(PY) bench/fanout.py
