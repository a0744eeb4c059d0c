"""prefect.yaml and conf/infra/prefect.yaml describe the same pools, and the entrypoint is the step flow."""

from __future__ import annotations

import yaml

from quantmill import constants as C
from quantmill.config import compose
from quantmill.runner import STEP_ENTRYPOINT
from tests.conftest import CONF, REPO


def test_prefect_yaml_deploys_the_step_flow_on_every_configured_pool():
    from prefect.flows import load_flow_from_entrypoint

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    pools = compose(["infra=prefect"], conf_dir=CONF).infra.pools
    assert [d["work_pool"]["name"] for d in deployments] == list(pools)
    for d in deployments:
        assert d["name"] == d["work_pool"]["name"] and d["entrypoint"] == STEP_ENTRYPOINT
        assert d["tags"] == ["quantmill", *pools[d["name"]].capabilities]
    assert load_flow_from_entrypoint(STEP_ENTRYPOINT).name == C.STEP_FLOW
