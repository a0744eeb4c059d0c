"""The unquantized MLX model (mlx-lm's own converter): the intermediate MLX recipes are measured against."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import CONVERTERS
from quantmill.backends.base import SourceInfo
from quantmill.errors import PreflightError
from quantmill.toolchain.versions import package_versions

MLX_DTYPES = ("float16", "bfloat16", "float32")

log = logging.getLogger(__name__)


def require_mlx(what: str) -> None:
    for package, pip_name in (("mlx", "mlx (mlx[cpu] on Linux)"), ("mlx_lm", "mlx-lm")):
        if importlib.util.find_spec(package) is None:
            raise PreflightError(f"{what} needs package {pip_name}: pip install '{pip_name.split()[0]}' mlx-lm, or "
                                 f"run it on a worker of a pool offering capability 'mlx'")


@functools.cache
def supported_model_type(model_type: str) -> bool:
    from mlx_lm.utils import MODEL_REMAPPING

    return importlib.util.find_spec(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}") is not None


def check_architecture(info: SourceInfo, model_name: str) -> None:
    model_type = info.config.get("model_type", "")
    if not supported_model_type(model_type):
        raise PreflightError(f"model {model_name!r} has model_type {model_type!r} ({info.architecture}), which "
                             f"mlx-lm {package_versions('mlx-lm')['mlx-lm']} does not support; choose a non-MLX recipe")


def mlx_convert(model: Path, out: Path, **kwargs: Any) -> None:
    """mlx_lm.convert into ``out`` (it insists on creating its output directory itself)."""
    from mlx_lm import convert

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / "mlx"
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):  # "[INFO] Loading" etc.: stdout carries the run's report
            convert(str(model), str(target), **kwargs)
        log.info("mlx_lm.convert: %s", " | ".join(chatter.getvalue().split("\n")).strip(" |"))
        for f in target.iterdir():
            if f.name != "README.md":  # mlx-lm's own card; quantmill writes the model card at publish
                shutil.move(str(f), out / f.name)


class MlxConverter:
    key = "mlx"
    capability = C.MLX
    identity = False

    def check(self, info: SourceInfo, model_name: str) -> None:
        require_mlx("format 'mlx'")
        check_architecture(info, model_name)

    def tools(self) -> dict[str, str]:
        return package_versions("mlx", "mlx-lm", "transformers")

    def convert(self, model: Path, out: Path, config: Mapping[str, Any]) -> dict[str, Any]:
        if config["dtype"] not in MLX_DTYPES:
            raise PreflightError(f"convert.mlx_dtype {config['dtype']!r} unknown; choose {', '.join(MLX_DTYPES)}")
        mlx_convert(model, out, dtype=config["dtype"])
        return {"outtype": config["dtype"]}


CONVERTERS.register(MlxConverter.key)(MlxConverter())
