"""``quantmill run -m hydra/launcher=prefect model=a,b 'recipe=[x],[y]'``: a sweep submitted, not run here.

Hydra's sweeper expands the overrides into jobs; this launcher composes each job's config exactly as an
in-process job would get it and submits it as a flow run of ``quantmill-pipeline/<pool>`` (the pipeline pool's
workers run it; see ``quantmill.prefect.deploy.submit_pipeline``). By default it returns once every job is submitted;
with ``hydra.launcher.wait=true`` it waits, and a job whose flow run did not complete fails the sweep.
"""


from dataclasses import dataclass
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass
class PrefectLauncherConf:
    _target_: str = "hydra_plugins.quantmill_launcher.prefect_launcher.PrefectLauncher"
    pool: Optional[str] = None  # default: the job's infra.pipeline_pool
    wait: bool = False
    poll_seconds: float = 2.0


ConfigStore.instance().store(group="hydra/launcher", name="prefect", node=PrefectLauncherConf, provider="quantmill")


class PrefectLauncher(Launcher):
    def __init__(self, pool: Optional[str] = None, wait: bool = False, poll_seconds: float = 2.0) -> None:
        self.pool, self.wait, self.poll_seconds = pool, wait, poll_seconds
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from quantmill.config import to_config
        from quantmill.prefect import deploy, server, waiting
        from quantmill.prefect.launch import SWEEP_SUBMISSIONS

        submitted = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            hydra_cfg = sweep_config.hydra
            with open_dict(sweep_config):
                del sweep_config["hydra"]
            cfg = to_config(sweep_config)
            if not submitted:
                server.connect(cfg.infra)
            name = f"sweep/{cfg.model.name}/{'+'.join(cfg.recipe)}#{idx}"
            flow_run_id = deploy.submit_pipeline(cfg, name=name, pool=self.pool or cfg.infra.pipeline_pool,
                                                 tags=["origin:sweep"])
            record = {"job": idx, "overrides": list(overrides), "name": name, "flow_run_id": flow_run_id,
                      "state": None}
            SWEEP_SUBMISSIONS.append(record)
            ret = JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=OmegaConf.create({"hydra": hydra_cfg}),
                            task_name=name, status=JobStatus.COMPLETED)
            ret.return_value = flow_run_id
            submitted.append((ret, record))
        if self.wait:
            for ret, record in submitted:
                record["state"] = waiting.wait_for_run(record["flow_run_id"], poll_seconds=self.poll_seconds)
                if record["state"] != "COMPLETED":
                    ret.status = JobStatus.FAILED
                    ret.return_value = RuntimeError(f"{record['name']}: flow run {record['flow_run_id']} ended "
                                                    f"{record['state']}")
        return [ret for ret, _ in submitted]
