"""A command knows which task it is: the master's task message carries the run's id (``Task.run``,
the issue-14 demonstration of adding a field) and the agent exports it as ``ZY_RUN_ID``, beside
``ZY_TASKID``, to what ``shell`` and ``exec`` start. Real master and agent processes."""

from __future__ import annotations

from fleet import Fleet


def test_shell_and_exec_see_their_run_and_taskid(fleet: Fleet) -> None:
    fleet.start_agent("env-0")
    fleet.wait_online("env-0")
    client = fleet.client
    for run in (client.run("echo $ZY_RUN_ID $ZY_TASKID", targets="env-0", timeout=30),
                client.run(["sh", "-c", "echo $ZY_RUN_ID $ZY_TASKID"], targets="env-0", timeout=30)):
        df = run.to_dataframe()
        assert df.loc[0, "status"] == "ok", df
        taskid = df.loc[0, "taskid"]
        assert taskid.startswith(f"{run.id}.")
        assert df.loc[0, "stdout"] == f"{run.id} {taskid}\n"
