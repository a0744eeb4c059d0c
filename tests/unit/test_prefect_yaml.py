"""prefect.yaml and conf/ describe the same deployments: the step flow on every pool, the pipeline flow on the
pipeline pool, and a scheduled watch for every batch with a cron."""

from __future__ import annotations

import yaml

from quantmill import constants as C
from quantmill.batches.batch import batch_names, load_batch
from quantmill.config import compose
from tests.conftest import CONF, REPO


def _deployments() -> dict[str, list[dict]]:
    by_entrypoint: dict[str, list[dict]] = {}
    for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        by_entrypoint.setdefault(d["entrypoint"], []).append(d)
    return by_entrypoint


def test_prefect_yaml_deploys_the_step_flow_on_every_configured_pool():
    from prefect.flows import load_flow_from_entrypoint

    steps = _deployments()[C.STEP_ENTRYPOINT]
    pools = compose(["infra=prefect"], conf_dir=CONF).infra.pools
    assert [d["work_pool"]["name"] for d in steps] == list(pools)
    for d in steps:
        assert d["name"] == d["work_pool"]["name"]
        assert d["tags"] == ["quantmill", *pools[d["name"]].capabilities]
    assert load_flow_from_entrypoint(C.STEP_ENTRYPOINT).name == C.STEP_FLOW


def test_prefect_yaml_has_the_pipeline_and_a_scheduled_watch_per_batch():
    from prefect.flows import load_flow_from_entrypoint

    infra = compose(["infra=prefect"], conf_dir=CONF).infra
    deployments = _deployments()
    assert [(d["name"], d["work_pool"]["name"]) for d in deployments[C.PIPELINE_ENTRYPOINT]] == \
        [(infra.pipeline_pool, infra.pipeline_pool)]
    batches = [load_batch(CONF, name) for name in batch_names(CONF)]
    watches = {d["name"]: d for d in deployments[C.WATCH_ENTRYPOINT]}
    assert sorted(watches) == sorted(b.name for b in batches if b.cron)
    for b in batches:
        d = watches[b.name]
        assert d["parameters"] == {"batch": b.name} and d["work_pool"]["name"] == infra.pipeline_pool
        assert d["schedules"] == [{"cron": b.cron, "timezone": b.timezone}]
    assert load_flow_from_entrypoint(C.PIPELINE_ENTRYPOINT).name == C.PIPELINE_FLOW
    assert load_flow_from_entrypoint(C.WATCH_ENTRYPOINT).name == C.WATCH_FLOW
