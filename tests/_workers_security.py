"""Worker for the checkpoint-security tests: real trained checkpoints, planted payloads, and
every command that loads a checkpoint, run in-process one after another (one spawn in all).

A payload is an object whose unpickling runs ``touch MARKER`` through ``os.system``: the
marker file exists afterwards if and only if the payload ran.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import torch

from _workers_train import TINY

STEPS = 2


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _capture(fn, argv) -> tuple[int, str]:
    """(exit code, stderr) of one command in this process."""
    os.environ["MASTER_PORT"] = _port()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = fn([str(a) for a in argv])
    return code, err.getvalue()


def _overrides(shards, ck, run_dir, engine, steps=STEPS):
    return [f"data.dir={shards}", f"checkpoint.dir={ck}", f"logging.run_dir={run_dir}",
            f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=1",
            "train.micro_batch_size=2", "train.global_batch_size=4", "data.eval_batches=0",
            "logging.progress_bar=false", "logging.wandb=off", f"engine.name={engine}"]


def _train(shards, ck, run_dir, engine):
    from megatron_sgtm.parallel import destroy_parallel, init_parallel
    from megatron_sgtm.train.config import load_experiment
    from megatron_sgtm.train.loop import train

    os.environ["MASTER_PORT"] = _port()
    cfg = load_experiment(TINY, _overrides(shards, ck, run_dir, engine))
    init_parallel(1, cfg.train.seed)
    try:
        train(cfg)
    finally:
        destroy_parallel()


# ---------------------------------------------------------------- planting


def _step(root: Path) -> Path:
    """The newest checkpoint under ``root``."""
    return [p for p in sorted(root.glob("step_*")) if ".tmp" not in p.name][-1]


def reseal(step: Path) -> None:
    """Record the current files' sha256 in sgtm_meta.json, as an attacker who knows the
    format would: only the pickle checks stand between the payload and the loader."""
    from megatron_sgtm.checkpoint import integrity

    meta_path = step / "sgtm_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = integrity.digests(step, integrity.list_files(step, exclude={"sgtm_meta.json"}))
    meta_path.write_text(json.dumps(meta))


def _byte_item(step: Path, marker: str) -> None:
    """Point one ShardedObject (a linear's _extra_state) at a payload appended to its file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md_path = step / "state" / ".metadata"
    metadata = pickle.loads(md_path.read_bytes())
    index = next(i for i in metadata.storage_data
                 if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save([Payload(marker)], blob)
    target = step / "state" / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(blob.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob.getvalue()))
    md_path.write_bytes(pickle.dumps(metadata))


def _into_torch_file(path: Path, marker: str) -> None:
    state = torch.load(path, weights_only=False)  # the test's own pristine file
    state["payload"] = Payload(marker)
    torch.save(state, path)


def _metadata(step: Path, marker: str) -> None:
    path = step / "state" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.payload = Payload(marker)  # BUILD restores it (and runs it) on unpickling
    path.write_bytes(pickle.dumps(metadata))


def _rank_file(step: Path, marker: str) -> None:
    torch.save({"extra": Payload(marker)}, step / "rank_00000.safetensors")


PLANTS = {  # file type -> (checkpoint it lives in, the file the error names, plant)
    "rank_state": ("megatron", "rank_00000.safetensors", _rank_file),
    "optimizer_common": ("megatron", "common.pt",
                         lambda s, m: _into_torch_file(s / "state" / "common.pt", m)),
    "dcp_metadata": ("megatron", ".metadata", _metadata),
    "dcp_byte_item": ("megatron", ".distcp", _byte_item),
    "deepspeed_model": ("deepspeed", "mp_rank_00_model_states.pt", lambda s, m: _into_torch_file(
        s / "deepspeed" / "state" / "mp_rank_00_model_states.pt", m)),
    "deepspeed_optimizer": ("deepspeed", "optim_states.pt", lambda s, m: _into_torch_file(
        s / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", m)),
}


def to_format_1(step: Path, marker: str | None) -> None:
    """Rewrite a checkpoint in format 1 (pickled per-rank file, no checksums)."""
    from megatron_sgtm.checkpoint import rank_state

    saved = rank_state.read(step / "rank_00000.safetensors")
    if marker:
        saved["extra"]["payload"] = Payload(marker)
    torch.save(saved, step / "rank_00000.pt")
    (step / "rank_00000.safetensors").unlink()
    meta = json.loads((step / "sgtm_meta.json").read_text())
    meta["format_version"] = 1
    meta.pop("files")
    (step / "sgtm_meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- the commands


def commands(shards: Path, out: Path, engine: str):
    """name -> argv builder (checkpoint root -> argv) with its entry point."""
    from megatron_sgtm.post import ablate_cli, attack_cli, eval_cli, rmu_cli
    from megatron_sgtm.train import cli as train_cli
    from megatron_sgtm.train import run as train_entry

    post = ["--data", shards, "--batch", 2]
    return {
        "ablate": (ablate_cli.main, lambda ck: [ck, "--out", out / "ablated"]),
        "eval": (eval_cli.main, lambda ck: [ck, *post, "--calibration-steps", 0,
                                            "--max-sequences", 2]),
        "attack": (attack_cli.main, lambda ck: [ck, *post, "--target-loss", 0.1, "--warmup", 0,
                                                "--cosine-steps", 1, "--max-steps", 1,
                                                "--eval-every", 1, "--eval-sequences", 2]),
        "rmu": (rmu_cli.main, lambda ck: [ck, "--data", shards, "--out", out / "rmu", "--layer", 1,
                                          "--steps", 1, "--batch", 2]),
        # `sgtm train` checks before it starts torchrun; the torchrun entry checks again.
        "train": (train_cli.main, lambda ck: ["--config", TINY, "--nproc", 1, *_overrides(
            shards, ck, out / "run", engine, STEPS + 1)]),
        "train_entry": (train_entry.main, lambda ck: ["--config", TINY, *_overrides(
            shards, ck, out / "run", engine, STEPS + 1)]),
    }


def _run(name, fn, argv) -> tuple[int, str]:
    if name == "train_entry":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    return _capture(fn, argv)


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def world_security(rank, world, tmp):
    from megatron_sgtm.data.testing import write_sample_shards
    from megatron_sgtm.post import ablate_cli

    tmp = Path(tmp)
    shards = tmp / "shards"
    write_sample_shards(shards, n_train=60, n_test=6)
    pristine = {engine: tmp / f"ck-{engine}" for engine in ("megatron", "deepspeed")}
    for engine, root in pristine.items():
        _train(shards, root, tmp / f"run-{engine}", engine)
    out: dict = {"files": {e: sorted(str(p.relative_to(_step(r))) for p in _step(r).rglob("*")
                                     if p.is_file()) for e, r in pristine.items()}}

    # Every planted file type x every command that loads a checkpoint.
    cases = {}
    for kind, (engine, names, plant) in PLANTS.items():
        for command, (fn, argv) in commands(shards, tmp / "out", engine).items():
            case = tmp / "cases" / f"{kind}-{command}"
            shutil.copytree(pristine[engine], case)
            marker = tmp / "markers" / f"{kind}-{command}"
            marker.parent.mkdir(exist_ok=True)
            plant(_step(case), str(marker))
            reseal(_step(case))
            shutil.rmtree(tmp / "out", ignore_errors=True)
            code, err = _run(command, fn, argv(case))
            cases[(kind, command)] = {"code": code, "err": err, "ran": marker.exists(),
                                      "names": names}
            shutil.rmtree(case)
    out["cases"] = cases

    # Controls: trusted (checks skipped), the same payloads do run when a loader reads them,
    # except in our own per-rank file, which is never unpickled. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    # stands for torch < 2.6, where megatron's torch.load of common.pt unpickles anything.
    controls = {}
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        for kind, (engine, _, plant) in PLANTS.items():
            command = "train_entry" if engine == "deepspeed" else "ablate"
            fn, argv = commands(shards, tmp / "out", engine)[command]
            case = tmp / "cases" / f"{kind}-trusted"
            shutil.copytree(pristine[engine], case)
            marker = tmp / "markers" / f"{kind}-trusted"
            plant(_step(case), str(marker))
            reseal(_step(case))
            shutil.rmtree(tmp / "out", ignore_errors=True)
            trust = ["checkpoint.trust_pickle=true"] if command == "train_entry" else \
                ["--trust-checkpoint"]
            _run(command, fn, [*argv(case), *trust])
            controls[kind] = marker.exists()
            shutil.rmtree(case)
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    out["controls"] = controls

    # Format 1: refused with the explanation unless trusted; trusted, it loads (and ablate
    # writes format 2).
    legacy = {}
    for command, (fn, argv) in commands(shards, tmp / "out", "megatron").items():
        case = tmp / "legacy" / command
        shutil.copytree(pristine["megatron"], case)
        marker = tmp / "markers" / f"legacy-{command}"
        to_format_1(_step(case), str(marker))
        shutil.rmtree(tmp / "out", ignore_errors=True)
        code, err = _run(command, fn, argv(case))
        legacy[command] = {"code": code, "err": err, "ran": marker.exists()}
        shutil.rmtree(case)
    case = tmp / "legacy" / "trusted"
    shutil.copytree(pristine["megatron"], case)
    to_format_1(_step(case), None)
    shutil.rmtree(tmp / "out", ignore_errors=True)
    legacy["trusted_ablate"] = _capture(ablate_cli.main, [case, "--out", tmp / "out" / "ablated",
                                                          "--trust-checkpoint"])
    legacy["trusted_ablate_format"] = json.loads(
        (_step(tmp / "out" / "ablated") / "sgtm_meta.json").read_text())["format_version"]
    cli_fn, cli_argv = commands(shards, tmp / "out", "megatron")["train"]
    os.environ["MASTER_PORT"] = _port()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        code = cli_fn([str(a) for a in [*cli_argv(case), "--trust-checkpoint", "--dry-run"]])
    legacy["trusted_cli"] = (code, printed.getvalue())
    train_fn, train_argv = commands(shards, tmp / "out", "megatron")["train_entry"]
    legacy["trusted_resume"] = _run("train_entry", train_fn, [*train_argv(case),
                                                              "checkpoint.trust_pickle=true"])
    legacy["resumed_format"] = json.loads(
        (_step(case) / "sgtm_meta.json").read_text())["format_version"]
    out["legacy"] = legacy

    # Integrity: a flipped byte, a missing and an added file; one error, nothing touched.
    integrity = {}
    for damage in ("flipped", "missing", "added"):
        case = tmp / "damaged" / damage
        shutil.copytree(pristine["megatron"], case)
        target = _step(case) / "state" / "__0_1.distcp"
        if damage == "flipped":
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0x01
            target.write_bytes(bytes(data))
        elif damage == "missing":
            target.unlink()
        else:
            (_step(case) / "state" / "extra.pt").write_bytes(b"not ours")
        before = tree(case)
        runs = {}
        for command in ("ablate", "train"):
            fn, argv = commands(shards, tmp / "out", "megatron")[command]
            shutil.rmtree(tmp / "out", ignore_errors=True)
            runs[command] = _run(command, fn, argv(case))
        integrity[damage] = {"runs": runs, "untouched": tree(case) == before}
    out["integrity"] = integrity
    out.update(hf_export_without_pickle(tmp, shards, pristine["megatron"]))
    return out


@contextlib.contextmanager
def no_pickle(calls: list):
    """Every unpickling entry point raises (and is recorded) while the block runs."""
    import _pickle

    def refuse(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} called on the safetensors path")
        return fn

    targets = [(pickle, "Unpickler"), (pickle, "load"), (pickle, "loads"),
               (_pickle, "Unpickler"), (_pickle, "load"), (_pickle, "loads"),
               (torch, "load"), (torch.serialization, "load")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    for owner, name in targets:
        setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def hf_export_without_pickle(tmp: Path, shards: Path, checkpoint: Path) -> dict:
    """`sgtm ablate --export hf`, then eval / attack / rmu on the export with pickle disabled;
    eval on the checkpoint itself for comparison."""
    from megatron_sgtm.post import ablate_cli, attack_cli, eval_cli, rmu_cli

    hf = tmp / "hf"
    out = {"export": _capture(ablate_cli.main, [checkpoint, "--out", hf, "--export", "hf"]),
           "hf_files": sorted(p.name for p in hf.iterdir())}
    post = ["--data", shards, "--batch", 2, "--max-sequences", 4]
    calls: list = []
    with no_pickle(calls):
        out["hf_eval"] = _capture(eval_cli.main, [hf, *post, "--calibration-steps", 3,
                                                  "--out", tmp / "hf_eval.jsonl"])
        out["hf_attack"] = _capture(attack_cli.main, [
            hf, "--data", shards, "--batch", 2, "--target-loss", 0.1, "--warmup", 0,
            "--cosine-steps", 2, "--max-steps", 2, "--eval-every", 1, "--eval-sequences", 2,
            "--out", tmp / "hf_attack.jsonl"])
        out["hf_rmu"] = _capture(rmu_cli.main, [hf, "--data", shards, "--out", tmp / "hf_rmu",
                                                "--layer", 1, "--steps", 1, "--batch", 2])
    out["pickle_calls"] = calls
    out["ck_eval"] = _capture(eval_cli.main, [checkpoint, *post, "--calibration-steps", 3,
                                              "--out", tmp / "ck_eval.jsonl"])
    for name in ("hf_eval", "ck_eval", "hf_attack"):
        path = tmp / f"{name}.jsonl"
        out[f"{name}_rows"] = [json.loads(l) for l in path.read_text().splitlines()] \
            if path.exists() else []
    # The export's record is verified: a changed weight file is refused by name.
    data = bytearray((hf / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (hf / "model.safetensors").write_bytes(bytes(data))
    out["hf_tampered"] = _capture(eval_cli.main, [hf, *post, "--calibration-steps", 0])
    return out
