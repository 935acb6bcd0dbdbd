"""The one table of tools/gpu_check.sh, from its parts.tsv, logs and run directories.

    python -m tools.gpu_check_table runs/gpu_check [--mode gpu|cpu|dry] [--out FILE.md] [--readme README.md]
    python -m tools.gpu_check_table --validate runs/gpu_check   # (dry run) every train.py line parses
    python -m tools.gpu_check_table --same-loss RUN RUN_REF [--after-step N | --val-only] --rtol R

parts.tsv: one line per part, ``name <TAB> status <TAB> seconds <TAB> budget <TAB> command or note``;
status is the exit code, ``timeout@Ns``, ``na`` (an interface not in this checkout), ``skipped`` or ``dry``.
The exit status is 0 only when every part passed (``dry``: when every command validated), so
``gpu_check.sh`` fails on any failed, cut, skipped or missing part.
"""
from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
from pathlib import Path


# bf16 dense peak, TFLOP/s, by device name (the MFU denominator)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}

WHAT = {
    "install": "install the carried wheels (.whl/)",
    "prepare": "tokenize the embedded corpus (mistral-v1)",
    "optim_cuda": "optimizer CUDA (Triton) cases vs the float64 oracle",
    "perf60m": "LLaMA-60M bf16 compiled, with eval: tokens/s, TFLOP/s, MFU, peak mem",
    "smoke_ddp": "train.py, DDP path (1 process), bf16, eager",
    "sync_ddp_compile": "sync debug 'error', DDP path, compiled",
    "sync_fsdp2": "sync debug 'error', FSDP2 (torchrun, 1 process)",
    "sync_zero2": "sync debug 'error', DeepSpeed ZeRO-2 (its own syncs counted)",
    "sync_zero3": "sync debug 'error', DeepSpeed ZeRO-3 (its own syncs counted)",
    "smoke_zero2_offload": "train.py, DeepSpeed ZeRO-2 + CPU offload",
    "ddp_2ranks_gloo": "2 ranks on one GPU over gloo (DDP)",
    "resume_zero2_to_4": "ZeRO-2 run stopped at step 4 (exit 75)",
    "resume_fsdp2_to_8": "... resumed by FSDP2 to step 8",
    "straight_fsdp2": "FSDP2 uninterrupted to step 8",
    "resume_matches": "resumed losses (steps 5-8) vs uninterrupted, rtol 1e-3",
    "default_fp32": "default job, fp32",
    "default_bf16_pure": "default job, train.precision=bf16_pure",
    "bf16_pure_matches": "bf16_pure final val loss within 1% of fp32",
}


def read_parts(w: Path) -> list[dict]:
    parts = []
    for line in (w / "parts.tsv").read_text().splitlines():
        name, status, secs, budget, note = (line.split("\t", 4) + [""] * 5)[:5]
        parts.append({"name": name, "status": status, "secs": int(secs or 0), "budget": int(budget or 0),
                      "note": note})
    return parts


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    """A part's metrics.jsonl records of ``kind`` ([] when the run wrote none)."""
    from amllm.metrics import MetricsFileError, read_metrics

    try:
        return read_metrics(run_dir, kind) if (run_dir / "metrics.jsonl").is_file() else []
    except MetricsFileError:
        return []


def last_error(log: Path) -> str:
    """The most telling line of a failed part's log: the last exception/error line."""
    if not log.is_file():
        return "no log"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error:|Exception|FAILED|Traceback)", ln) and not ln.startswith("File "):
            return ln[:160]
    return lines[-1][:160] if lines else "empty log"


def describe_what(name: str) -> str:
    if name in WHAT:
        return WHAT[name]
    if name.startswith("bench_"):
        _, shapes, dtype = name.split("_", 2)
        return f"optimizer step, {shapes.upper()} shapes, {dtype}"
    if name.startswith("smoke_"):
        rest = name[len("smoke_"):]
        compiled = rest.endswith("_compile")
        backend = rest.removesuffix("_compile").replace("zero2_offload", "DeepSpeed ZeRO-2 + CPU offload")
        backend = backend.replace("zero2", "DeepSpeed ZeRO-2").replace("ddp", "DDP path (1 process)")
        backend = backend.replace("fsdp2", "FSDP2 (torchrun, 1 process)")
        return f"train.py smoke: {backend}, bf16, {'compiled' if compiled else 'eager'}"
    if name.startswith("study_"):
        opt, wu = name[len("study_"):].rsplit("_", 1)
        return f"warmup study, LLaMA-20M: {opt}, {'warmup' if wu == 'warmup' else 'no warmup'}"
    return name


def bench_figures(log: str) -> str:
    ms = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^\s+(\S.*?)\s+([\d.]+) ms/step", log, re.M)}
    launches = {m.group(1).strip(): m.group(2) for m in
                re.finditer(r"^\s+(\S.*?)\s+.*?([\d.]+) launches/step", log, re.M)}
    ams = [k for k in ms if k.startswith("AM")]
    am = next((k for k in ("AMAdamW default (auto)", "AMAdamW fused") if k in ms), ams[0] if ams else None)
    base = ms.get("AdamW fused")
    if am is None or base is None:
        return "no ms/step lines in the output"
    out = f"{am} {ms[am]:.2f} ms vs AdamW fused {base:.2f} ms = **{ms[am] / base:.2f}x**"
    others = [f"{k.removeprefix('AMAdamW ')} {ms[k] / base:.2f}x" for k in ams if k != am]
    if others:
        out += f" ({', '.join(others)})"
    if am in launches and "AdamW fused" in launches:
        out += f"; launches/step {launches[am]} vs {launches['AdamW fused']}"
    else:
        out += "; launches/step n/a (not printed by the bench)"
    return out


def train_figures(run_dir: Path) -> str:
    recs = records(run_dir)
    if not recs:
        return "no metrics"
    first, last = recs[0], recs[-1]
    out = f"{len(recs)} logs to step {last['step']}, loss {first['loss']:.3f} → {last['loss']:.3f}"
    evals = records(run_dir, "eval")
    if evals:
        out += f", val {evals[-1]['val_loss']:.3f}"
    return out


def perf_figures(run_dir: Path, mem_file: Path) -> str:
    recs = records(run_dir)[1:]  # the first log includes compilation
    if not recs:
        return "no metrics after the first log"
    tps = statistics.median(r["tokens_per_s"] for r in recs)
    tflops = statistics.median(r["tflops"] for r in recs)
    out = f"{tps:,.0f} tokens/s, {tflops:.1f} TFLOP/s"
    peak = _peak_tflops()
    out += f", MFU {100 * tflops / peak:.1f}% (of {peak:.0f} bf16 dense)" if peak else ", MFU n/a (unknown GPU peak)"
    mem_key = next((k for k in ("peak_mem_gib", "max_memory_allocated_gib", "peak_memory_gib") if k in recs[-1]), None)
    if mem_key:
        out += f", peak {recs[-1][mem_key]:.1f} GiB (metrics)"
    elif mem_file.is_file() and mem_file.read_text().split():
        mib = max(int(x) for x in mem_file.read_text().split() if x.isdigit())
        out += f", peak {mib / 1024:.1f} GiB (nvidia-smi, whole GPU)"
    else:
        out += ", peak memory n/a"
    return out


def _peak_tflops() -> float | None:
    try:
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except Exception:
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def study_figures(run_dir: Path) -> str:
    recs = records(run_dir)
    if not recs:
        return "no metrics"
    out = f"step {recs[-1]['step']}: train loss {recs[-1]['loss']:.3f}"
    evals = records(run_dir, "eval")
    if evals:
        out += f", val loss **{evals[-1]['val_loss']:.3f}**"
    lows = [r["beta_min"] for r in recs if r.get("beta_min") is not None]
    highs = [r["beta_max"] for r in recs if r.get("beta_max") is not None]
    if lows:
        out += f", β in [{min(lows):.3f}, {max(highs):.3f}]"
    return out


def figures(part: dict, w: Path) -> str:
    name, log = part["name"], w / "logs" / f"{part['name']}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    if name == "optim_tests":
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|tests collected).*?)\s*=*$", text, re.M)
        return m[-1] if m else "no pytest summary"
    if name.startswith("bench_"):
        return bench_figures(text)
    if name == "perf60m":
        return perf_figures(w / "perf60m", w / "logs" / "perf60m.mem")
    if name.startswith("study_"):
        return study_figures(w / name)
    if name.endswith("_matches"):
        return text.strip().splitlines()[-1][:200] if text.strip() else ""
    if name.startswith(("smoke_", "sync_", "default_", "straight_", "ddp_")):
        return train_figures(w / name)
    if name.startswith("resume_"):
        return train_figures(w / "resume")
    if name == "prepare":
        m = re.search(r"train ([\d,]+) tokens.*val ([\d,]+) tokens", text)
        return f"train {m.group(1)} / val {m.group(2)} tokens" if m else ""
    return part["note"]


def row(part: dict, w: Path) -> tuple[str, str, str]:
    s = part["status"]
    if s == "na":
        return "n/a", f"({part['note']})", "-"
    if s == "skipped":
        return "skipped", part["note"], "-"
    if s == "dry":
        return "dry-run", "command printed above", "-"
    secs = f"{part['secs']} s"
    if s == "0":
        return "ok", figures(part, w), secs
    cut = s.startswith("timeout")
    fig = figures(part, w) if part["name"].startswith("study_") else ""
    why = f"cut at its budget ({s[8:]})" if cut else f"exit {s}: {last_error(w / 'logs' / (part['name'] + '.log'))}"
    return ("cut" if cut and fig and fig != "no metrics" else "FAIL"), (f"{fig}; {why}" if fig else why), secs


def table(w: Path, mode: str, total_s: int) -> str:
    head = {"gpu": "GPU", "cpu": "CPU (--cpu: tiny sizes, not GPU figures)", "dry": "dry run (nothing executed)"}[mode]
    device = _device_name() if mode == "gpu" else ""
    lines = [f"### tools/gpu_check.sh — {head}{', ' + device if device else ''}, {total_s} s", "",
             "| part | result | figures | time / budget |", "| --- | --- | --- | --- |"]
    for part in read_parts(w):
        result, fig, secs = row(part, w)
        lines.append(f"| {describe_what(part['name'])} | {result} | {fig.replace('|', '/')} | {secs} / {part['budget']} s |")
    return "\n".join(lines) + "\n"


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except Exception:
        return ""


def passed(w: Path, mode: str) -> bool:
    """Every part ok (a dry run: every part printed); n/a, skipped, cut and failed parts all fail."""
    parts = read_parts(w)
    return bool(parts) and all(p["status"] == ("dry" if mode == "dry" else "0") for p in parts)


def same_loss(run: Path, ref: Path, rtol: float, after_step: int = 0, val_only: bool = False) -> tuple[bool, str]:
    """Does ``run`` reach the losses of ``ref``? Train losses of the steps after ``after_step`` that
    both logged (unless ``val_only``) and the final validation loss, each within ``rtol``."""
    pairs = []
    if not val_only:
        mine = {r["step"]: r["loss"] for r in records(run) if r["step"] > after_step}
        theirs = {r["step"]: r["loss"] for r in records(ref) if r["step"] > after_step}
        pairs += [(f"step {k} loss", mine[k], theirs[k]) for k in sorted(mine.keys() & theirs.keys())]
    ev, ev_ref = records(run, "eval"), records(ref, "eval")
    if ev and ev_ref:
        pairs.append(("final val loss", ev[-1]["val_loss"], ev_ref[-1]["val_loss"]))
    if not pairs:
        return False, f"nothing to compare: no common logged steps after {after_step} or final evals in {run} and {ref}"
    name, a, b = max(pairs, key=lambda t: abs(t[1] - t[2]) / abs(t[2]))
    rel = abs(a - b) / abs(b)
    verdict = "within" if rel <= rtol else "OUTSIDE"
    return rel <= rtol, f"{len(pairs)} compared, worst {name}: {a:.5f} vs {b:.5f} ({rel:.2e}, {verdict} rtol {rtol:g})"


def put_in_readme(readme: Path, text: str) -> None:
    """Replace what sits between the README's gpu-status markers with ``text``."""
    start, end = "<!-- gpu-status:start -->", "<!-- gpu-status:end -->"
    doc = readme.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"error: {readme} has no {start} ... {end} markers under '## GPU status'; add them")
    head, rest = doc.split(start, 1)
    readme.write_text(head + start + "\n" + text + rest[rest.index(end):])


def study_steps(w: Path, budget_s: float, max_steps: int, runs: int = 4, batch: int = 1024, seq: int = 256) -> int:
    """Steps of LLaMA-20M each of the ``runs`` concurrent study runs can finish in ``budget_s``, from
    the TFLOP/s that LLaMA-60M sustained alone (compiled) at the same batch, halved for eager mode;
    40 s are kept for start-up and the final evaluation. Multiples of 10 (the logging interval)."""
    recs = records(w / "perf60m")[1:]
    if not recs:
        return max(10, max_steps // 3)
    from amllm.config import ModelConfig
    from amllm.model import flops_per_token, load_llama_config

    hf = load_llama_config(ModelConfig(name="llama_20m"), vocab_size=32000)
    h = hf.hidden_size  # non-embedding parameters: attention + MLP matrices, and the LM head
    n = hf.num_hidden_layers * (4 * h * h + 3 * h * hf.intermediate_size) + hf.vocab_size * h
    step_s = runs * flops_per_token(hf, n, seq) * batch * seq / (0.5 * statistics.median(r["tflops"] for r in recs) * 1e12)
    steps = int((budget_s - 40) / step_s) // 10 * 10
    return max(10, min(max_steps, steps))


def validate(w: Path) -> int:
    """Every recorded train.py command line must parse into a config (and its DeepSpeed JSON validate)."""
    from amllm.config import ConfigError, load_config
    from amllm.parallel.deepspeed_backend import validate_ds_config
    from train import parse_args

    bad = 0
    for part in read_parts(w):
        argv = shlex.split(part["note"]) if part["status"] == "dry" else []
        if "train.py" not in argv:
            continue
        args = parse_args(argv[argv.index("train.py") + 1:])
        try:
            cfg = load_config(args.config, args.overrides)
            cfg.total_steps()
            if cfg.parallel.backend == "deepspeed":
                validate_ds_config(cfg.parallel.deepspeed_config, cfg, world_size=1)
        except ConfigError as e:
            print(f"error: {part['name']}: {e}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, nargs="?")
    ap.add_argument("--mode", default="gpu", choices=["gpu", "cpu", "dry"])
    ap.add_argument("--total-s", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    ap.add_argument("--validate", action="store_true", help="check the dry run's train.py command lines")
    ap.add_argument("--readme", type=Path, help="also put the table under this README's GPU status markers")
    ap.add_argument("--same-loss", nargs=2, type=Path, metavar=("RUN", "REF"),
                    help="exit 0 when RUN's losses match REF's within --rtol (see same_loss)")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--after-step", type=int, default=0)
    ap.add_argument("--val-only", action="store_true")
    ap.add_argument("--study-steps", nargs=2, type=int, metavar=("BUDGET_S", "MAX_STEPS"),
                    help="print the warmup study's steps that fit BUDGET_S (from the LLaMA-60M speed)")
    args = ap.parse_args(argv)
    if args.same_loss:
        ok, line = same_loss(*args.same_loss, args.rtol, args.after_step, args.val_only)
        print(line)
        return 0 if ok else 1
    if args.workdir is None:
        ap.error("give the gpu_check work directory (runs/gpu_check)")
    if args.study_steps:
        print(study_steps(args.workdir, *args.study_steps))
        return 0
    if not (args.workdir / "parts.tsv").is_file():
        print(f"error: no parts.tsv in {args.workdir}; run bash tools/gpu_check.sh first", file=sys.stderr)
        return 2
    if args.validate:
        return validate(args.workdir)
    if args.mode == "dry":  # the commands in full, above the table
        print("".join(f"{p['name']}: {p['note'].strip()}\n" for p in read_parts(args.workdir) if p["status"] == "dry"))
    text = table(args.workdir, args.mode, args.total_s)
    ok = passed(args.workdir, args.mode)
    verdict = {True: "Every command printed and validated; nothing ran." if args.mode == "dry" else "All parts passed.",
               False: "NOT ACCEPTED: a part above failed, was cut, skipped or missing."}[ok]
    text += "\n" + verdict + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.readme:
        put_in_readme(args.readme, text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
