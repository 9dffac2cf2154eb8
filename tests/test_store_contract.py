"""The Store contract (master/store/protocol.py), the same tests on SQLiteStore (a file in a
tmp dir) and on PostgresStore (a fresh database on a real, throwaway PostgreSQL): every method
of the store's own sections (the cluster's are tests/test_cluster_store.py's, blobs
tests/test_cluster_blobs.py's). Then what only PostgreSQL has: several stores on one database
at once (event cursors under concurrent writers, a token's last use raced for), a PostgreSQL
restarted under a store in use, and the migration runner under an advisory lock.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from pg import PgServer

from hcsdk.protocol.messages import Done, Out, Sample, Start
from hcsdk.protocol.tasks import TaskStatus
from master.store import Result, SchemaError, Store, StoreThread, TokenUsedUp, open_store
from master.store.migrate import MIGRATIONS, migrations
from master.store.postgres import PostgresStore
from master.store.postgres_migrate import MIGRATIONS_PG, applied_pg, migrate_pg

NOW = time.time()
LATER = NOW + 600


def _start(uuid: str, taskid: str, seq: int = 0, at: float = NOW) -> tuple[str, Result]:
    return uuid, Start(uuid=uuid, cmd="echo", taskid=taskid, seq=seq, started_at=at)


def _out(uuid: str, taskid: str, seq: int, data: str = "hi\n") -> tuple[str, Result]:
    return uuid, Out(uuid=uuid, cmd="echo", taskid=taskid, seq=seq, stream="stdout", data=data)


def _done(uuid: str, taskid: str, seq: int, status: TaskStatus = TaskStatus.OK, **kw: Any) -> tuple[str, Result]:
    return uuid, Done(uuid=uuid, cmd="echo", taskid=taskid, seq=seq, status=status, exit_code=0,
                      started_at=NOW, finished_at=NOW + 1, **kw)


def _sample(uuid: str, series: str, seq: int, at: float, **fields: Any) -> tuple[str, Result]:
    return uuid, Sample(uuid=uuid, cmd="zy.schedule.tick", taskid=f"s-{series}", seq=seq, series=series, time=at,
                        status=TaskStatus.OK, fields=fields)


def _enrolled(store: Store, *names: str, kind: str = "agent") -> None:
    store.add_join_token("tok", "hash", 3600, "for tests")
    for name in names:
        store.enroll(name, f"cred-{name}", "tok", {"hostname": f"host-{name}", "os": "linux"}, {"role": "web"},
                     b"k" * 32, kind)


def _run(store: Store, run_id: str, targets: dict[str, str], deadline: float = LATER) -> list[dict[str, Any]]:
    return store.create_run(run_id, "echo", {"msg": "hi"}, 30.0,
                            [(f"{run_id}.{uuid}", uuid, status, deadline) for uuid, status in targets.items()])


# -- meta and schema ----------------------------------------------------------------------
def test_meta_values_are_set_replaced_and_initialised_once(store: Store) -> None:
    assert store.get_meta("k") is None
    store.set_meta("k", "one")
    store.set_meta("k", "two")
    assert store.get_meta("k") == "two"
    assert store.init_meta("fresh", "first") == "first"
    assert store.init_meta("fresh", "second") == "first"
    assert store.init_meta("k", "three") == "two"


def test_schema_versions_are_every_shipped_migration(store: Store) -> None:
    folder = MIGRATIONS_PG if isinstance(store, PostgresStore) else MIGRATIONS
    versions = store.schema_versions()
    assert sorted(versions) == [m.version for m in migrations(folder)]
    assert all(isinstance(at, float) and at > 0 for at in versions.values())


# -- join tokens, agents ------------------------------------------------------------------
def test_join_tokens_are_listed_without_their_secret_and_revoked(store: Store) -> None:
    made = store.add_join_token("t1", "secret-hash", 60, "first", kind="proxy", proxy_names=["edge-1"], max_uses=2)
    assert made["secret_hash"] == "secret-hash" and made["revoked"] is False and made["proxy_names"] == ["edge-1"]
    assert made["expires_at"] == pytest.approx(made["created_at"] + 60)
    assert (made["kind"], made["max_uses"], made["uses"], made["description"]) == ("proxy", 2, 0, "first")
    store.add_join_token("t2", "h2", 60, "second")
    assert store.join_token("t1") == made
    listed = store.join_tokens()
    assert [t["id"] for t in listed] == ["t1", "t2"] and all("secret_hash" not in t for t in listed)
    assert listed[1]["kind"] == "agent" and listed[1]["proxy_names"] == [] and listed[1]["max_uses"] == 0
    assert store.revoke_join_token("t1") and not store.revoke_join_token("nope")
    token = store.join_token("t1")
    assert token is not None and token["revoked"] is True
    assert store.join_token("nope") is None


def test_enrollment_counts_uses_and_refuses_past_max(store: Store) -> None:
    store.add_join_token("t", "h", 60, "", max_uses=2)
    assert store.enroll("a1", "c1", "t", {"hostname": "h1"}, {}, b"1" * 32) == []
    assert store.enroll("a1", "c1b", "t", {"hostname": "h1"}, {}, b"2" * 32) == []  # again: not another use
    assert store.enroll("a2", "c2", "t", {"hostname": "h1"}, {}, b"3" * 32) == ["a1"]  # same hostname: warned
    with pytest.raises(TokenUsedUp):
        store.enroll("a3", "c3", "t", {"hostname": "h3"}, {}, b"4" * 32)
    with pytest.raises(TokenUsedUp):
        store.enroll("a4", "c4", "no-such-token", {"hostname": "h4"}, {}, b"5" * 32)
    token = store.join_token("t")
    assert token is not None and token["uses"] == 2
    assert store.agent("a3") is None
    agent = store.agent("a1")
    assert agent is not None and agent["credential_hash"] == "c1b" and agent["e2e_key"] == b"2" * 32


def test_agent_records_are_in_python_types(store: Store) -> None:
    _enrolled(store, "a1")
    rec = store.agent("a1")
    assert rec is not None
    assert rec == {**rec, "uuid": "a1", "credential_hash": "cred-a1", "token_id": "tok", "hostname": "host-a1",
                   "facts": {"hostname": "host-a1", "os": "linux"}, "labels": {"role": "web"}, "last_seen": None,
                   "revoked": False, "connects": 0, "e2e_key": b"k" * 32, "kind": "agent"}
    assert isinstance(rec["enrolled_at"], float) and type(rec["e2e_key"]) is bytes
    assert list(rec) == ["uuid", "credential_hash", "token_id", "hostname", "facts", "labels", "enrolled_at",
                         "last_seen", "revoked", "connects", "e2e_key", "kind"]
    assert store.agent("nope") is None


def test_connects_touches_revocation_and_targets(store: Store) -> None:
    _enrolled(store, "a1", "a2")
    _enrolled_proxy(store)
    store.agent_connected("a1", {"hostname": "renamed", "cpu": 4}, {"role": "db"})
    rec = store.agent("a1")
    assert rec is not None and rec["connects"] == 1 and rec["hostname"] == "renamed" and rec["labels"] == {"role": "db"}
    assert rec["facts"] == {"hostname": "renamed", "cpu": 4} and isinstance(rec["last_seen"], float)
    store.touch_agents({"a1": 123.5, "a2": 456.0, "unknown": 1.0})
    store.touch_agents({})
    assert [(a["uuid"], a["last_seen"]) for a in store.agents()] == [("a2", 456.0), ("p1", None), ("a1", 123.5)]
    assert [t["uuid"] for t in store.target_rows()] == ["a2", "a1"]  # not the proxy; by hostname
    assert store.target_row("a1") == {"uuid": "a1", "hostname": "renamed", "labels": {"role": "db"}}
    assert store.target_row("nope") is None
    assert store.revoke_agent("a2") and not store.revoke_agent("nope")
    assert [a["uuid"] for a in store.agents()] == ["p1", "a1"]
    assert [a["uuid"] for a in store.agents(include_revoked=True)] == ["a2", "p1", "a1"]
    assert [t["uuid"] for t in store.target_rows()] == ["a1"]


def _enrolled_proxy(store: Store) -> None:
    store.add_join_token("ptok", "h", 60, "", kind="proxy", proxy_names=["edge"])
    store.enroll("p1", "cp", "ptok", {"hostname": "host-p"}, {}, b"", kind="proxy")


# -- runs, tasks, events ------------------------------------------------------------------
def test_a_run_with_offline_targets_gets_their_done_events(store: Store) -> None:
    _enrolled(store, "a1", "a2")
    made = _run(store, "r1", {"a1": "dispatched", "a2": "offline"})
    assert [(e["run_id"], e["taskid"], e["uuid"], e["seq"], e["kind"]) for e in made] == \
        [("r1", "r1.a2", "a2", 0, "done")]
    assert store.run_exists("r1") and not store.run_exists("r2")
    assert store.run_open_count("r1") == 1
    run = store.run("r1")
    assert run is not None and run["args"] == {"msg": "hi"} and run["total"] == 2 and run["open"] == 1
    assert run["cmd"] == "echo" and run["timeout"] == 30.0
    tasks = {t["taskid"]: t for t in run["tasks"]}
    assert tasks["r1.a2"]["status"] == "offline" and tasks["r1.a2"]["final_source"] == "master"
    assert tasks["r1.a1"]["hostname"] == "host-a1" and tasks["r1.a1"]["cancel_requested"] == 0
    assert store.run("nope") is None
    events = store.events_after("r1", 0)
    assert [e["id"] for e in events] == [made[0]["id"]]
    assert events[0]["data"] == '{"status":"offline","error":"agent is offline"}'
    assert store.task("r1.a1") == {"taskid": "r1.a1", "uuid": "a1", "status": "dispatched", "cmd": "echo"}
    assert store.task("nope") is None
    assert store.task_runs(["r1.a1", "r1.a2", "nope", "r1.a1"]) == {"r1.a1": ("r1", "a1"), "r1.a2": ("r1", "a2")}
    assert store.task_runs([]) == {}


def test_ingest_stores_results_once_and_acknowledges_everything(store: Store) -> None:
    _enrolled(store, "a1", "a2")
    _run(store, "r1", {"a1": "dispatched", "a2": "dispatched"})
    batch = [_start("a1", "r1.a1"), _out("a1", "r1.a1", 1, "x\ty\n\\z"), _done("a1", "r1.a1", 2, result={"n": 1}),
             _out("a2", "r1.a1", 3),  # not a2's task: acknowledged, not stored
             _out("a2", "nope", 0)]  # no such task
    acks, changed = store.ingest(batch)
    assert acks == {"a1": [["r1.a1", 0], ["r1.a1", 1], ["r1.a1", 2]], "a2": [["r1.a1", 3], ["nope", 0]]}
    assert changed == {"r1"}
    events = store.events_after("r1", 0)
    assert [(e["taskid"], e["seq"], e["kind"]) for e in events] == [("r1.a1", 0, "start"), ("r1.a1", 1, "out"),
                                                                    ("r1.a1", 2, "done")]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert '"data":"x\\ty\\n\\\\z"' in events[1]["data"]
    # resent (and resent twice in one batch): acknowledged again, stored once, nothing changed
    acks, changed = store.ingest([_out("a1", "r1.a1", 1), _out("a1", "r1.a1", 1)])
    assert acks == {"a1": [["r1.a1", 1], ["r1.a1", 1]]} and changed == set()
    assert len(store.events_after("r1", 0)) == 3
    assert store.events_after("r1", events[0]["id"], limit=1) == [events[1]]
    run = store.run("r1")
    assert run is not None
    task = next(t for t in run["tasks"] if t["taskid"] == "r1.a1")
    assert (task["status"], task["exit_code"], task["final_source"], task["started_at"]) == ("ok", 0, "agent", NOW)
    assert task["finished_at"] == NOW + 1 and task["truncated"] == "{}"
    assert store.run_open_count("r1") == 1
    assert store.run_outcomes("r1") == {"a1": {"status": "ok", "error": None, "result": {"n": 1}},
                                        "a2": {"status": "dispatched", "error": None, "result": None}}


def test_an_agents_verdict_replaces_a_presumed_one_but_not_its_own(store: Store) -> None:
    _enrolled(store, "a1")
    _run(store, "r1", {"a1": "dispatched"})
    assert store.finish_by_master([("r1.a1", "offline", "went away")]) == {"r1"}
    assert store.finish_by_master([("r1.a1", "timeout", "late")]) == set()  # already final
    store.ingest([_done("a1", "r1.a1", 0, TaskStatus.FAILED, error="boom")])
    store.ingest([_done("a1", "r1.a1", 1, TaskStatus.OK)])  # a second verdict of its own: kept the first
    task = store.run("r1")["tasks"][0]  # type: ignore[index]
    assert (task["status"], task["error"], task["final_source"]) == ("failed", "boom", "agent")
    kinds = [(e["seq"], e["kind"]) for e in store.events_after("r1", 0)]
    assert kinds == [(-1, "done"), (0, "done"), (1, "done")]


def test_a_start_after_done_or_twice_moves_nothing_back(store: Store) -> None:
    _enrolled(store, "a1", "a2")
    _run(store, "r1", {"a1": "dispatched", "a2": "dispatched"})
    store.ingest([_start("a1", "r1.a1", 0, at=5.0), _start("a1", "r1.a1", 1, at=6.0), _done("a2", "r1.a2", 1)])
    store.ingest([_start("a2", "r1.a2", 0, at=7.0)])
    tasks = {t["taskid"]: t for t in store.run("r1")["tasks"]}  # type: ignore[index]
    assert (tasks["r1.a1"]["status"], tasks["r1.a1"]["started_at"]) == ("running", 5.0)
    assert (tasks["r1.a2"]["status"], tasks["r1.a2"]["started_at"]) == ("ok", NOW)


def test_open_tasks_dispatch_cancel_and_overdue(store: Store) -> None:
    _enrolled(store, "a1", "a2")
    _run(store, "r1", {"a1": "pending", "a2": "dispatched"}, deadline=NOW + 10)
    _run(store, "r2", {"a1": "offline"})
    open_a1 = store.open_tasks_for("a1")
    assert [(t["taskid"], t["status"], t["cancel_requested"], t["cmd"]) for t in open_a1] == \
        [("r1.a1", "pending", 0, "echo")]
    assert open_a1[0]["args"] == '{"msg":"hi"}' and open_a1[0]["timeout"] == 30.0  # args as stored
    store.mark_dispatched(["r1.a1", "r2.a1", "nope"])
    store.mark_dispatched([])
    assert store.task("r1.a1")["status"] == "dispatched"  # type: ignore[index]
    assert store.task("r2.a1")["status"] == "offline"  # type: ignore[index]  # final: not moved
    assert sorted(store.open_task_agents()) == ["a1", "a2"]
    assert sorted(t["taskid"] for t in store.overdue_tasks(NOW + 11)) == ["r1.a1", "r1.a2"]
    assert store.overdue_tasks(NOW + 9) == []
    cancelled = store.request_cancel("r1")
    assert sorted((t["taskid"], t["uuid"], t["status"]) for t in cancelled) == \
        [("r1.a1", "a1", "dispatched"), ("r1.a2", "a2", "dispatched")]
    assert [t["cancel_requested"] for t in store.open_tasks_for("a2")] == [1]
    assert store.finish_by_master([("r1.a1", "cancelled", "cancelled"), ("r1.a1", "timeout", "x"),
                                   ("nope", "timeout", "x")]) == {"r1"}
    assert store.task("r1.a1")["status"] == "cancelled"  # type: ignore[index]
    assert store.open_task_agents() == ["a2"]
    assert store.finish_by_master([]) == set()
    verdict = store.events_after("r1", 0)[-1]
    assert (verdict["seq"], verdict["kind"], verdict["data"]) == (-1, "done",
                                                                  '{"status":"cancelled","error":"cancelled"}')


def test_what_an_agent_sends_is_stored_even_with_nul_characters(store: Store) -> None:
    """An agent's strings go into text columns (PostgreSQL refuses NUL in them): a result it
    cannot store would be resent for ever, so it must be stored (or acknowledged) like any other."""
    _enrolled(store, "a1")
    _run(store, "r1", {"a1": "dispatched"})
    acks, changed = store.ingest([_done("a1", "r1.a1", 0, TaskStatus.FAILED, error="bad\x00byte"),
                                  _out("a1", "r1\x00.a1", 1, "\x00"), _sample("a1", "cpu\x00", 0, 10.0, v="\x00")])
    assert acks == {"a1": [["r1.a1", 0], ["r1\x00.a1", 1], ["s-cpu\x00", 0]]} and changed == {"r1"}
    assert store.task("r1\x00.a1") is None and store.task_runs(["r1\x00.a1"]) == {}
    error = store.run("r1")["tasks"][0]["error"]  # type: ignore[index]
    assert error.startswith("bad") and error.endswith("byte") and len(error) == 8
    assert '"error":"bad\\u0000byte"' in store.events_after("r1", 0)[0]["data"]  # the payload as it came
    store.agent_connected("a1", {"hostname": "h\x00"}, {"k": "\x00"})
    assert store.agent("a1")["labels"] == {"k": "\x00"}  # type: ignore[index]


# -- schedules and samples ----------------------------------------------------------------
def test_schedules_are_put_replaced_listed_and_deleted(store: Store) -> None:
    store.put_schedule("cpu", "zy.sample", {"what": "cpu"}, 10.0, 5.0, {"labels": {"role": "web"}})
    store.put_schedule("cpu", "zy.sample", {"what": "cpu2"}, 20.0, 5.0, {"uuids": ["a1"]})
    store.put_schedule("mem", "zy.sample", {}, 30.0, 5.0, {})
    spec = store.schedule("cpu")
    assert spec is not None and (spec["args"], spec["every"], spec["targets"]) == ({"what": "cpu2"}, 20.0,
                                                                                  {"uuids": ["a1"]})
    assert list(spec) == ["name", "cmd", "args", "every", "timeout", "targets", "created_at"]
    assert store.schedule("nope") is None
    store.ingest([_sample("a1", "cpu", 0, 100.0, v=1), _sample("a1", "cpu", 1, 200.0, v=2)])
    listed = store.schedules()
    assert [(s["name"], s["samples"], s["last_sample"]) for s in listed] == [("cpu", 2, 200.0), ("mem", 0, None)]
    assert sorted(s["name"] for s in store.schedule_specs()) == ["cpu", "mem"]
    store.delete_schedule("mem")
    store.delete_schedule("nope")
    assert [s["name"] for s in store.schedule_specs()] == ["cpu"]


def test_series_are_read_by_time_and_forgotten(store: Store) -> None:
    _enrolled(store, "a1", "a2")
    batch = [_sample("a1", "cpu", i, 100.0 + i, v=i) for i in range(5)] + [_sample("a2", "cpu", 0, 100.0, v=9),
                                                                        _sample("a2", "mem", 0, 50.0, v=1)]
    acks, changed = store.ingest(batch)
    assert changed == set() and len(acks["a1"]) == 5
    store.ingest([_sample("a1", "cpu", 0, 100.0, v=99)])  # a resend: kept as first stored
    rows = store.series("cpu", None, None, 100)
    assert [(r["uuid"], r["time"], r["fields"]["v"]) for r in rows] == \
        [("a1", 100.0, 0), ("a2", 100.0, 9), ("a1", 101.0, 1), ("a1", 102.0, 2), ("a1", 103.0, 3), ("a1", 104.0, 4)]
    assert rows[0] == {"uuid": "a1", "hostname": "host-a1", "time": 100.0, "status": "ok", "fields": {"v": 0},
                       "error": None}
    assert [r["time"] for r in store.series("cpu", 101.0, 103.0, 100)] == [101.0, 102.0, 103.0]
    assert len(store.series("cpu", None, None, 2)) == 2
    assert store.forget_samples(102.0) == 4  # 100 (two), 101 of cpu, 50 of mem
    assert [r["time"] for r in store.series("cpu", None, None, 100)] == [102.0, 103.0, 104.0]


def test_schedules_given_are_the_schedule_set_tasks_an_agent_had(store: Store) -> None:
    _enrolled(store, "a1", "a2")
    for name, target in (("cpu", "a1"), ("mem", "a1"), ("disk", "a2")):
        store.create_run(f"set-{name}", "zy.schedule.set", {"name": name, "every": 5}, 30.0,
                         [(f"set-{name}.{target}", target, "dispatched", LATER)])
    store.create_run("odd", "zy.schedule.set", {"name": 7}, 30.0, [("odd.a1", "a1", "dispatched", LATER)])
    store.create_run("other", "echo", {"name": "not-a-schedule"}, 30.0, [("o.a1", "a1", "dispatched", LATER)])
    assert store.schedules_given("a1") == {"cpu", "mem"}
    assert store.schedules_given("a2") == {"disk"} and store.schedules_given("nope") == set()


# -- artifacts and releases ---------------------------------------------------------------
def test_artifacts_by_id_or_newest_of_a_name(store: Store) -> None:
    store.add_artifact("sha-1", "app", 10, "d1", {"chunks": ["c1"]}, 100.0)
    store.add_artifact("sha-2", "app", 20, "d2", {"chunks": ["c2"]}, 200.0)
    store.add_artifact("sha-1", "app", 99, "other", {}, 300.0)  # already there: kept as it was
    assert [(a["id"], a["size"]) for a in store.artifacts()] == [("sha-1", 10), ("sha-2", 20)]
    newest = store.artifact("app")
    assert newest == {"id": "sha-2", "name": "app", "size": 20, "sha256": "d2", "manifest": {"chunks": ["c2"]},
                      "created_at": 200.0}
    assert store.artifact("sha-1")["manifest"] == {"chunks": ["c1"]}  # type: ignore[index]
    assert store.artifact("nope") is None


def _release(store: Store) -> None:
    store.add_release({"id": "rel", "artifact_id": "sha-1", "name": "app", "manifest": {"m": 1}, "dest": "/opt/app",
                       "options": {"shards": 2}, "shards": [["a1"], ["a2", "a3"]], "state": "queued",
                       "created_at": 10.0, "updated_at": 10.0},
                      [("a1", "h1", 0), ("a2", "h2", 1), ("a3", "h3", 1)])


def test_releases_are_added_listed_and_updated_by_state(store: Store) -> None:
    _release(store)
    rel = store.release("rel")
    assert rel is not None and rel["manifest"] == {"m": 1} and rel["shards"] == [["a1"], ["a2", "a3"]]
    assert (rel["state"], rel["shard"], rel["step"], rel["step_run"], rel["message"]) == ("queued", 0, "", "", "")
    assert store.release("nope") is None
    assert [r["id"] for r in store.releases()] == ["rel"] and "manifest" not in store.releases()[0]
    assert store.releases()[0]["shards"] == [["a1"], ["a2", "a3"]]
    assert store.release_ids(("queued", "running")) == ["rel"] and store.release_ids(("done",)) == []
    assert store.update_release("rel", {"state": "running", "options": {"x": [1]}, "shard": 1}, expect=("queued",))
    assert not store.update_release("rel", {"state": "paused"}, expect=("queued",))
    assert store.update_release("rel", {"message": "hello", "updated_at": 11.0})
    assert not store.update_release("nope", {"message": "x"})
    with pytest.raises(ValueError, match="not a release field"):
        store.update_release("rel", {"id": "evil"})
    rel = store.release("rel")
    assert rel is not None and (rel["state"], rel["options"], rel["shard"], rel["message"], rel["updated_at"]) == \
        ("running", {"x": [1]}, 1, "hello", 11.0)


def test_release_targets_move_through_their_steps(store: Store) -> None:
    _release(store)
    targets = store.release_targets("rel")
    assert [(t["uuid"], t["shard"], t["phase"], t["status"], t["placed"]) for t in targets] == \
        [("a1", 0, "queued", "pending", False), ("a2", 1, "queued", "pending", False),
         ("a3", 1, "queued", "pending", False)]
    store.start_release_step("rel", ["a2", "a3"], "fetch", 50.0)
    store.start_release_step("rel", ["a2", "a3"], "place", 60.0)  # started_at kept
    store.record_release_step("rel", 70.0, [("a3", "disk full")], ["a2"],
                              [("a2", {"size": 100, "bytes_upstream": 60, "bytes_peers": 40, "reused": 1,
                                       "seconds": 0.5})])
    by = {t["uuid"]: t for t in store.release_targets("rel")}
    assert (by["a2"]["phase"], by["a2"]["started_at"], by["a2"]["placed"]) == ("place", 50.0, True)
    assert (by["a2"]["bytes"], by["a2"]["bytes_upstream"], by["a2"]["bytes_peers"], by["a2"]["reused"],
            by["a2"]["fetch_s"]) == (100, 60, 40, 1, 0.5)
    assert (by["a3"]["status"], by["a3"]["error"], by["a3"]["finished_at"]) == ("failed", "disk full", 70.0)
    assert sorted(store.pending_release_targets("rel")) == ["a1", "a2"]
    assert store.placed_release_targets("rel") == ["a2"]
    assert store.failed_release_targets("rel") == 1
    store.finish_release_shard("rel", ["a2", "a3"], 80.0)
    by = {t["uuid"]: t for t in store.release_targets("rel")}
    assert (by["a2"]["phase"], by["a2"]["status"], by["a2"]["finished_at"]) == ("done", "ok", 80.0)
    assert by["a3"]["status"] == "failed"
    store.set_release_targets_status("rel", ["a2"], "rolled_back")
    assert [(t["phase"], t["status"]) for t in store.release_targets("rel") if t["uuid"] == "a2"] == \
        [("rolled_back", "rolled_back")]
    assert store.pending_release_targets("rel") == ["a1"]


# -- PostgreSQL only: several stores on one database --------------------------------------
def _two_stores(url: str) -> tuple[PostgresStore, PostgresStore]:
    return PostgresStore(url), PostgresStore(url)


def test_concurrent_writers_of_one_run_never_make_a_cursor_reader_skip(pg_url: str) -> None:
    """Two masters' stores ingest results of the same run at once (and one writes verdicts of
    its own) while a reader pages ``events_after`` by cursor: the reader gets every event
    exactly once, because every writer of a run's events locks the run first and ids are taken
    in commit order."""
    one, two = _two_stores(pg_url)
    reader = PostgresStore(pg_url)
    try:
        agents = [f"a{i}" for i in range(40)]
        _enrolled(one, *agents)
        _run(one, "r", {a: "dispatched" for a in agents})
        errors: list[BaseException] = []
        done = threading.Event()

        def write(store: PostgresStore, mine: list[str]) -> None:
            try:
                for seq in range(30):
                    store.ingest([_out(a, f"r.{a}", seq) for a in mine])
                store.finish_by_master([(f"r.{a}", "timeout", "late") for a in mine[:5]])
            except BaseException as err:  # (reported by the main thread)
                errors.append(err)

        seen: list[int] = []

        def read() -> None:
            cursor = 0
            while True:
                last = done.is_set()  # read once more after the writers ended
                page = reader.events_after("r", cursor, limit=37)
                seen.extend(e["id"] for e in page)
                cursor = page[-1]["id"] if page else cursor
                if last and not page:
                    return

        writers = [threading.Thread(target=write, args=(one, agents[:20])),
                   threading.Thread(target=write, args=(two, agents[20:]))]
        paging = threading.Thread(target=read)
        paging.start()
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        done.set()
        paging.join()
        assert not errors, errors
        stored = [e["id"] for e in reader.events_after("r", 0, limit=10_000)]
        assert len(stored) == 40 * 30 + 10
        assert seen == stored  # every one, once, in order
    finally:
        for s in (one, two, reader):
            s.close()


def test_two_stores_racing_for_a_tokens_uses_never_exceed_them(pg_url: str) -> None:
    one, two = _two_stores(pg_url)
    try:
        one.add_join_token("t", "h", 60, "", max_uses=5)
        won: list[str] = []
        refused: list[str] = []
        start = threading.Barrier(2)

        def enroll(store: PostgresStore, prefix: str) -> None:
            start.wait()
            for i in range(10):
                uuid = f"{prefix}{i}"
                try:
                    store.enroll(uuid, "c", "t", {"hostname": uuid}, {}, b"")
                    won.append(uuid)
                except TokenUsedUp:
                    refused.append(uuid)

        threads = [threading.Thread(target=enroll, args=(s, p)) for s, p in ((one, "x"), (two, "y"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 5 and len(refused) == 15
        token = two.join_token("t")
        assert token is not None and token["uses"] == 5
        assert sorted(a["uuid"] for a in one.agents()) == sorted(won)
    finally:
        one.close()
        two.close()


def test_results_ingested_while_postgresql_restarts_are_stored_once_when_resent(pg_server: PgServer,
                                                                                 pg_url: str) -> None:
    """A writer ingests one result after another, resending what failed (as an agent resends
    what was not acknowledged), while PostgreSQL restarts under it: every result is stored once,
    and every batch that returned is stored."""
    store = PostgresStore(pg_url)
    try:
        _enrolled(store, "a1")
        _run(store, "r1", {"a1": "dispatched"})
        acked: list[int] = []
        failures: list[BaseException] = []
        restarted = threading.Event()

        def write() -> None:
            seq, deadline = 0, time.monotonic() + 120
            while (seq < 200 or not restarted.is_set()) and time.monotonic() < deadline:
                try:
                    store.ingest([_out("a1", "r1.a1", seq)])
                except psycopg.OperationalError as err:
                    failures.append(err)
                    time.sleep(0.05)
                    continue  # resent next time round
                acked.append(seq)
                seq += 1

        writer = threading.Thread(target=write)
        writer.start()
        while len(acked) < 50 and writer.is_alive():
            time.sleep(0.01)
        pg_server.restart()
        restarted.set()
        writer.join()
        stored = [e["seq"] for e in store.events_after("r1", 0, limit=10_000)]
        assert stored == sorted(set(acked)) and len(acked) >= 200
    finally:
        store.close()


def test_a_restarted_postgresql_fails_a_call_then_the_store_carries_on(pg_server: PgServer, pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        _enrolled(store, "a1")
        _run(store, "r1", {"a1": "dispatched"})
        store.ingest([_start("a1", "r1.a1")])
        pg_server.restart()
        failed = 0
        for _ in range(3):  # the first call may meet a connection the restart cut: it raises
            try:
                store.get_meta("x")
                break
            except psycopg.OperationalError:
                failed += 1
        assert failed <= 1
        acks, changed = store.ingest([_done("a1", "r1.a1", 1)])
        assert changed == {"r1"} and store.run_open_count("r1") == 0
        assert [e["kind"] for e in store.events_after("r1", 0)] == ["start", "done"]
    finally:
        store.close()


def test_a_call_during_an_outage_raises(pg_server: PgServer, pg_url: str) -> None:
    """While PostgreSQL is down a call fails (the master's ingest then has agents resend)
    instead of hanging; once it is back, calls work again."""
    store = PostgresStore(pg_url)
    try:
        store.set_meta("k", "v")
        pg_server.stop()
        try:
            with pytest.raises(psycopg.OperationalError):  # (the pool's PoolTimeout is one too)
                store.set_meta("k", "w")
        finally:
            pg_server.start()
        for _ in range(3):
            try:
                assert store.get_meta("k") == "v"
                break
            except psycopg.OperationalError:
                continue
        assert store.get_meta("k") == "v"
    finally:
        store.close()


# -- PostgreSQL only: migrations ----------------------------------------------------------
def test_masters_starting_at_once_migrate_once(pg_url: str) -> None:
    opened: list[PostgresStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(PostgresStore(pg_url, pool_size=1))
        except BaseException as err:  # (reported by the main thread)
            errors.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        applied = sorted(v for s in opened for v in s.migrated)
        assert applied == [m.version for m in migrations(MIGRATIONS_PG)]  # by exactly one of them
    finally:
        for s in opened:
            s.close()


def test_a_store_from_the_previous_schema_is_upgraded_and_a_newer_one_refused(pg_url: str, tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    shipped = migrations(MIGRATIONS_PG)
    (first / "0001_initial.sql").write_text(shipped[0].sql)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert migrate_pg(conn, first) == [1]
        conn.execute("INSERT INTO meta(k, v) VALUES('kept', 'yes')")
    store = PostgresStore(pg_url)
    try:
        assert store.migrated == [m.version for m in shipped[1:]] and store.get_meta("kept") == "yes"
    finally:
        store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert migrate_pg(conn) == []  # nothing twice
        conn.execute("INSERT INTO schema_version(version, name, applied_at) VALUES(%s, 'future', 0)",
                     (len(shipped) + 1,))
    with pytest.raises(SchemaError, match="newer master"):
        PostgresStore(pg_url)


def test_a_failing_migration_leaves_nothing_behind(pg_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "0001_a.sql").write_text("CREATE TABLE one (x int);\n-- a comment\nCREATE TABLE two (y int);")
    (folder / "0002_b.sql").write_text("CREATE TABLE three (z int);\nSELECT no_such_function();")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrate_pg(conn, folder)
        assert applied_pg(conn) == {}
        assert conn.execute("SELECT to_regclass('one'), to_regclass('three')").fetchone() == (None, None)


def test_an_unreachable_store_is_named_in_the_error_without_its_password() -> None:
    with pytest.raises(RuntimeError, match=r"cannot open the store at postgresql://zy:\*\*\*@127\.0\.0\.1:1/db") as err:
        PostgresStore("postgresql://zy:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value)
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:1/db\?password=\*\*\*&") as err:
        PostgresStore("postgresql://zy@127.0.0.1:1/db?password=secret&sslmode=disable")
    assert "secret" not in str(err.value)


def test_staging_tables_survive_a_first_transaction_that_rolled_back(pg_url: str) -> None:
    """ingest's staging tables are made once per connection, outside the transaction: made in
    one that rolled back, they would be gone while the connection is noted as having them."""
    store = PostgresStore(pg_url, pool_size=1)
    try:
        with pytest.raises(ZeroDivisionError), store.transaction(staging=True):
            1 / 0  # noqa: B018 - the failure inside the first transaction of the connection
        _enrolled(store, "a1")
        _run(store, "r1", {"a1": "dispatched"})
        assert store.ingest([_start("a1", "r1.a1"), _sample("a1", "cpu", 0, 1.0)])[1] == {"r1"}
        assert store.run_open_count("r1") == 1 and len(store.series("cpu", None, None, 10)) == 1
    finally:
        store.close()


@pytest.mark.anyio
async def test_store_calls_run_as_many_at_once_as_the_store_takes(pg_url: str, tmp_path: Path) -> None:
    pg, lite = PostgresStore(pg_url, pool_size=3), open_store(tmp_path)
    try:
        assert StoreThread(pg).capacity == 3 and StoreThread(lite).capacity == 1
        thread = StoreThread(pg)
        async with anyio.create_task_group() as tg:  # three calls that each wait for the others
            for _ in range(3):
                tg.start_soon(thread, _meet_in_the_store, pg)
    finally:
        pg.close()
        lite.close()


_MEET = threading.Barrier(3, timeout=30)


def _meet_in_the_store(store: PostgresStore) -> None:
    _MEET.wait()  # passes only when three calls run at once
    assert store.get_meta("nothing") is None


# -- both stores, side by side ------------------------------------------------------------
def _scenario(store: Store) -> dict[str, Any]:
    """One of everything, then every read: what the API would return, store by store."""
    _enrolled(store, "a1", "a2", "a3")
    _enrolled_proxy(store)
    store.agent_connected("a2", {"hostname": "Zed", "n": 1.5}, {"role": "db", "Ä": "ü"})
    store.touch_agents({"a1": 1000.25})
    out: dict[str, Any] = {"offline": _run(store, "r1", {"a1": "dispatched", "a2": "pending", "a3": "offline"})}
    out["ingest"] = store.ingest([_start("a1", "r1.a1"), _out("a1", "r1.a1", 1, "é\t\\\n"), _done("a1", "r1.a1", 2),
                                  _out("a2", "r1.a1", 5), _sample("a1", "cpu", 0, 10.0, v=[1, {"x": None}])])
    store.mark_dispatched(["r1.a2"])
    out["cancel"] = store.request_cancel("r1")
    out["finished"] = store.finish_by_master([("r1.a2", "cancelled", "by you")])
    store.put_schedule("cpu", "zy.sample", {"k": [1, 2]}, 10.0, 5.0, {"labels": {}})
    store.add_artifact("sha", "app", 5, "d", {"chunks": []}, 1.0)
    _release(store)
    store.record_release_step("rel", 2.0, [("a3", "no")], ["a1"], [("a1", {"size": 5, "seconds": 1})])
    reads = {
        "tokens": store.join_tokens(), "token": store.join_token("tok"), "agents": store.agents(True),
        "agent": store.agent("a2"), "targets": store.target_rows(), "run": store.run("r1"),
        "events": store.events_after("r1", 0), "outcomes": store.run_outcomes("r1"), "task": store.task("r1.a1"),
        "open": store.open_tasks_for("a1"), "overdue": store.overdue_tasks(LATER + 1),
        "schedules": store.schedules(), "series": store.series("cpu", None, None, 10),
        "artifacts": store.artifacts(), "release": store.release("rel"), "releases": store.releases(),
        "release_targets": store.release_targets("rel"), "given": sorted(store.schedules_given("a1")),
    }
    return {**out, **reads}


def _steady(value: Any) -> Any:
    """``value`` with the clock's readings (the store's time.time()) made one word."""
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_steady(v) for v in value)
    if isinstance(value, float) and abs(value - time.time()) < 86_400 * 2 and value not in (NOW, NOW + 1, LATER):
        return "now"
    return value


def test_both_stores_answer_alike(pg_url: str, tmp_path: Path) -> None:
    lite, pg = open_store(tmp_path), open_store(tmp_path, pg_url)
    try:
        got_lite, got_pg = _steady(_scenario(lite)), _steady(_scenario(pg))
    finally:
        lite.close()
        pg.close()
    for key, value in got_lite.items():
        assert got_pg[key] == value, key
        assert [type(v) for v in _leaves(got_pg[key])] == [type(v) for v in _leaves(value)], key
        if isinstance(value, list) and value and isinstance(value[0], dict):
            assert [list(r) for r in got_pg[key]] == [list(r) for r in value], key  # key order too (the API's JSON)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for k in sorted(value) for leaf in _leaves(value[k])]
    if isinstance(value, list | tuple | set):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
