"""Publishing to the Hugging Face Hub, through huggingface_hub's own ``create_repo`` / ``create_commit``.

One commit per artifact: its files (a GGUF over ``publish.split_max_gb`` split by llama.cpp's
``llama-gguf-split``), the model card (``base_model``, ``base_model_relation: quantized``, ``quantized_by``, tags,
metrics, provenance summary), the provenance record and its signature. ``publish.hf_layout`` places it: ``repo``
(the repo root), ``branch`` (a branch named after the recipe) or ``folder`` (a folder named after the recipe).
Publishing again is a no-op: when the record already there has the same bytes (compared by git blob id), no
commit is made. The token comes from the environment (HF_TOKEN) or huggingface_hub's login; it is never logged
or recorded.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import PUBLISHERS
from quantmill.errors import PreflightError, PublishRefused
from quantmill.store.local import ArtifactRef, Store

LAYOUTS = ("repo", "branch", "folder")


def _get(publish: Any, name: str) -> Any:
    return publish.get(name) if isinstance(publish, Mapping) else getattr(publish, name)


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub, for non-LFS files) gives these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def split_gguf(path: Path, max_gb: float, out: Path) -> list[Path]:
    """``path`` as is, or its parts by ``llama-gguf-split`` when larger than ``max_gb`` (GiB, in whole MiB)."""
    from quantmill.toolchain.llamacpp import locate
    from quantmill.toolchain.tools import run_tool

    max_mib = max(1, int(max_gb * 1024))
    if path.stat().st_size <= max_mib * 2**20:
        return [path]
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / path.stem
    run_tool([locate().tool("llama-gguf-split"), "--split", "--split-max-size", f"{max_mib}M", path, prefix],
             name="llama-gguf-split", label=f"split {path.name}")
    parts = sorted(out.glob(f"{path.stem}-*-of-*.gguf"))
    if not parts:
        raise PublishRefused(f"llama-gguf-split wrote no parts for {path.name}")
    return parts


class HfPublisher:
    key = "hf"

    def destination(self, publish: Any) -> str:
        return f"hf://{_get(publish, 'repo_id')}#{_get(publish, 'hf_layout')}"

    def check(self, publish: Any, store: Store) -> None:
        from huggingface_hub import get_token

        layout = _get(publish, "hf_layout")
        if layout not in LAYOUTS:
            raise PreflightError(f"publish.hf_layout {layout!r} unknown; choose one of {', '.join(LAYOUTS)}")
        try:
            _get(publish, "repo_id").format(name="n", model="m", recipe="r")
        except (KeyError, IndexError) as e:
            raise PreflightError(f"publish.repo_id {_get(publish, 'repo_id')!r} uses an unknown field {e}; it may use "
                                 f"{{name}}, {{model}} and {{recipe}}") from None
        if not get_token():
            raise PreflightError("publish.publisher=hf needs a Hugging Face token with write access: set HF_TOKEN in "
                                 "the environment (or run `hf auth login`); it is never written to conf/ or records")

    def repo_and_place(self, settings: Mapping[str, Any], result: Mapping[str, Any]) -> tuple[str, str, str]:
        """(repo id, revision, folder prefix) of one artifact under the configured layout."""
        repo = settings["repo_id"].format(name=result["name"], model=result["model"], recipe=result["recipe"])
        layout = settings["hf_layout"]
        revision = result["recipe"] if layout == "branch" else "main"
        prefix = f"{result['recipe']}/" if layout == "folder" else ""
        return repo, revision, prefix

    def publish(self, spec, store: Store, ref: ArtifactRef) -> dict[str, Any]:
        from huggingface_hub import CommitOperationAdd, HfApi
        from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

        from quantmill.backends.local_publisher import record_bytes
        from quantmill.store import provenance, signing

        settings = spec.context["publish"]
        result = store.read_result(ref)
        repo, revision, prefix = self.repo_and_place(settings, result)
        artifact = ArtifactRef(result["artifact"]["key"], result["artifact"]["digest"], "")
        record = record_bytes(store.statement(artifact.key))
        api = HfApi()
        api.create_repo(repo, private=settings["private"], exist_ok=True)
        if revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        try:
            remote = {p.path: p for p in api.get_paths_info(repo, [f"{prefix}provenance.json"], revision=revision)}
        except (EntryNotFoundError, RevisionNotFoundError):
            remote = {}
        there = remote.get(f"{prefix}provenance.json")
        if there is not None and getattr(there, "blob_id", None) == git_blob_id(record):
            return {"repo": repo, "revision": revision, "path": prefix, "commit": None, "unchanged": True}
        signer = signing.signer_from(settings.get("signing_key"))
        files = store.files(artifact)
        with tempfile.TemporaryDirectory(prefix="quantmill-hf-") as tmp:
            ops = []
            for subject in provenance.user_subjects_of(store.statement(artifact.key)):
                path = files / subject.path
                parts = split_gguf(path, settings["split_max_gb"], Path(tmp)) if path.suffix == ".gguf" else [path]
                ops += [CommitOperationAdd(f"{prefix}{p.name}", str(p)) for p in parts]
            ops += [CommitOperationAdd(f"{prefix}{C.MODEL_CARD_FILE}", store.read_file(ref, C.MODEL_CARD_FILE)),
                    CommitOperationAdd(f"{prefix}provenance.json", record)]
            if signer is not None:
                ops.append(CommitOperationAdd(f"{prefix}provenance.sig.json", signing.sign(record, signer)))
            message = (f"quantmill: {result['name']} ({result.get('quant_type') or result['format']}), artifact "
                       f"{artifact.digest}")
            commit = api.create_commit(repo, ops, commit_message=message, revision=revision,
                                       commit_description=f"Recipe `{result['recipe']}` of model `{result['model']}`; "
                                                          f"provenance in {prefix}provenance.json.")
        return {"repo": repo, "revision": revision, "path": prefix, "commit": commit.oid, "unchanged": False,
                "files": sorted(op.path_in_repo for op in ops)}

    def is_published(self, spec, store: Store, ref: ArtifactRef) -> bool:
        """A committed publish record means its commit was made (asking the Hub on every plan would need network)."""
        return True


PUBLISHERS.register(HfPublisher.key)(HfPublisher())
