"""``opd-jax``: train | eval | sample | analyze | demo | rank-prompts | align-prompts | study |
build-cold-start.

    opd-jax train configs/demo.yaml [key.sub=value ...] [--fresh]
    opd-jax eval  configs/demo.yaml [overrides]     # the config's eval stages on its student
    opd-jax sample configs/demo.yaml --prompt "What is 2+3?" [--teacher]
    opd-jax analyze runs/demo                        # PNG plots + summary.md
    opd-jax demo                                     # train configs/demo.yaml, then analyze
    opd-jax rank-prompts configs/select_demo.yaml [select.rule.top_n=16]   # by teacher signals
    opd-jax align-prompts configs/teacher_aligned_dapo_deepmath.yaml   # the paper's construct
    opd-jax study --config configs/study_demo.yaml [--small] [--fresh]
    opd-jax build-cold-start configs/qwen3_cold_start.yaml [--force]  # teacher-rollout SFT data
    opd-jax export runs/demo --to hf exported/demo   # HF folder (or --to gguf file.gguf)
    opd-jax config show configs/demo.yaml [overrides] # the resolved config, every field
    opd-jax serve-teacher configs/demo.yaml [--host 127.0.0.1] [--port 8471]   # teacher over HTTP
    opd-jax cache-teacher configs/qwen3_cold_start.yaml --out cache/teacher [--k 64]

Every command that takes a config accepts it positionally or as ``--config FILE``.
``select-prompts`` is the former name of ``rank-prompts`` (still accepted, with a notice).
"""

# The subcommand handlers import what they run inside their bodies (not at the top) only so that
# `opd-jax --help` and argument errors answer without importing JAX; no import cycle is involved.

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path


def _load(args):
    from opd_jax.config import load_config

    return load_config(args.config, args.overrides)


def _compilation_cache(cfg):
    """JAX's persistent compilation cache in ``cfg.compilation_cache`` while a command runs."""
    from opd_jax.compile_options import compilation_cache

    return compilation_cache(cfg.compilation_cache)


def cmd_train(args) -> int:
    from opd_jax.analyze import write_report
    from opd_jax.train import distributed as mesh_lib
    from opd_jax.train.run import format_summary, run

    cfg = _load(args)
    # multi-process: initialise first (run() would do it too) so that only process 0 deletes or
    # writes the shared run directory
    mesh_lib.init_distributed(cfg.mesh.distributed)
    if args.fresh:
        if mesh_lib.is_primary() and cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)
        mesh_lib.barrier("fresh_run_dir")
    with _compilation_cache(cfg):
        summary = run(cfg, progress=not args.no_progress)
    if mesh_lib.is_primary():
        print(format_summary(summary))
        report = write_report(cfg.run_dir)
        print(f"\nreport: {report} (plots beside it)")
        print(f"export the student: opd-jax export {cfg.run_dir} --to hf exported/{cfg.name}")
    return 0


def cmd_eval(args) -> int:
    from opd_jax.train.run import format_summary, run

    cfg = _load(args)
    evals = tuple(s for s in cfg.stages if s.kind == "eval")
    if not evals:
        raise SystemExit(f"{args.config} has no eval stage; add one, e.g. "
                         "stages: [{kind: eval, n_prompts: 40}]")
    cfg = dataclasses.replace(cfg, stages=evals)
    # a partial config: it must neither be checked against nor replace the run's record
    with _compilation_cache(cfg):
        summary = run(cfg, progress=not args.no_progress, record=False)
    print(format_summary(summary))
    return 0


def cmd_sample(args) -> int:
    from opd_jax.data import PromptTemplate
    from opd_jax.data.templates import render_prompt
    from opd_jax.sampling.generation import generate
    from opd_jax.train.models import build_models

    cfg = _load(args)
    models = build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    tok = models.tokenizer
    template = PromptTemplate(student_template="{problem}",
                              chat_template_kwargs=cfg.data.chat_template_kwargs)
    prompt = tok.encode(render_prompt(tok, template.student({"prompt": args.prompt}),
                                      template.chat_template_kwargs))
    if args.teacher:
        model = models.teacher
    else:
        from opd_jax.model.loading import Model

        params, lora = models.student.params_and_lora(models.trainable, models.frozen)
        model = Model(models.student.config, params, tok, lora)
    with _compilation_cache(cfg):
        out = generate(model, [prompt], max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed, eos_ids=tok.eos_ids)
    print(tok.decode(out.tokens[0]))
    return 0


def cmd_analyze(args) -> int:
    from opd_jax.analyze import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_rank_prompts(args) -> int:
    from opd_jax.select_prompts import load_select_config, select_prompts

    if args.command == "select-prompts":
        print("opd-jax: note: select-prompts is now rank-prompts (it ranks a pool by teacher "
              "signals); the paper's teacher-aligned selection is align-prompts", file=sys.stderr)
    cfg, sel = load_select_config(args.config, args.overrides)
    with _compilation_cache(cfg):
        summary = select_prompts(cfg, sel, progress=not args.no_progress)
    print(f"selected {summary['selected_count']} of {summary['pool']} prompts; "
          f"report: {summary['out_dir']}/report.md")
    return 0


def cmd_build_cold_start(args) -> int:
    from opd_jax.cold_start import build_cold_start, format_summary

    cfg = _load(args)
    with _compilation_cache(cfg):
        summary = build_cold_start(cfg, stage=args.stage, out=args.out, force=args.force,
                                   batch_rows=args.batch_rows, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


def cmd_align_prompts(args) -> int:
    from opd_jax.align_prompts import align_prompts, format_table, load_align_config, write_texts

    cfg = load_align_config(args.config, args.overrides)
    if args.texts_only:
        print("\n".join(f"wrote {p}" for p in write_texts(cfg)))
        return 0
    summary = align_prompts(cfg, progress=not args.no_progress)
    print(format_table(summary))
    print(f"\naligned.jsonl, control.jsonl, similarities.jsonl, summary.json, report.md in "
          f"{summary['out_dir']}")
    return 0


def cmd_study(args) -> int:
    from opd_jax.study import load_study_config, run_study

    cfg, study, sel = load_study_config(args.config, args.overrides, small=args.small)
    summary = run_study(cfg, study, sel, progress=not args.no_progress, fresh=args.fresh)
    for f in summary["findings"]:
        print(f"{f['id']} {f['finding']}: {f['verdict']}")
    print(f"report: {summary['out_dir']}/report.md")
    return 0


def cmd_config(args) -> int:
    from opd_jax.config import load_config
    from opd_jax.config.core import dump_config

    file = args.file
    if file is not None and "=" in file and not Path(file).exists():
        args.overrides, file = [file, *args.overrides], None
    if file is None and not args.overrides:   # the schema's defaults (not a runnable config)
        from opd_jax.config.run import RunConfig

        print("# opd_jax config defaults; a run also needs stages, e.g. "
              "stages: [{kind: opd, steps: 100}]")
        print(dump_config(RunConfig()), end="")
        return 0
    print(dump_config(load_config(file, args.overrides)), end="")
    return 0


def cmd_export(args) -> int:
    from opd_jax.export import export_run

    s = export_run(args.run_dir, args.out, to=args.to, stage=args.stage, step=args.step,
                   lora_only=args.lora_only, force=args.force, dtype=args.dtype,
                   gguf_type=args.gguf_type, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    done = "finished" if s["stage_done"] else "interrupted, last saved step"
    print(f"exported stage {s['stage']!r} step {s['step']} ({done}) of {s['run_dir']} "
          f"to {s['out']} ({s['to']}): {', '.join(s['files'])}")
    if s["to"] == "hf" and s.get("tokenizer") is None:
        print("note: the student's tokenizer has no Hugging Face form (byte tokenizer of a random "
              "test model); no tokenizer files were written")
    if s["to"] == "hf" and not args.lora_only:
        print("load it with:\n  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"  model = AutoModelForCausalLM.from_pretrained({s['out']!r})\n"
              f"  tok = AutoTokenizer.from_pretrained({s['out']!r})")
    return 0


def cmd_serve_teacher(args) -> int:
    from opd_jax.teacher.server import serve_from_config

    cfg = _load(args)
    with _compilation_cache(cfg):
        serve_from_config(cfg, host=args.host, port=args.port, token_env=args.token_env,
                          k_max=args.k_max, max_request_bytes=int(args.max_request_mb * (1 << 20)))
    return 0


def cmd_cache_teacher(args) -> int:
    from opd_jax.teacher.cache_build import build_cache

    cfg = _load(args)
    with _compilation_cache(cfg):
        summary = build_cache(cfg, out=args.out, dataset=args.dataset, k=args.k,
                              batch_rows=args.batch_rows, force=args.force,
                              progress=not args.no_progress)
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    print(f"train from it: opd-jax train CONFIG teacher.source={args.out}")
    return 0


def cmd_demo(args) -> int:
    config = Path(args.config)
    if not config.exists():
        raise SystemExit(f"{config} not found: run `opd-jax demo` from the repository root or "
                         "pass --config path/to/demo.yaml")
    args.config, args.fresh, args.no_progress = str(config), args.fresh, args.no_progress
    return cmd_train(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"opd-jax {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, help_, default=None, overrides="key.sub=value overrides"):
        # the config file, positionally or as --config FILE (either spelling, every command)
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", nargs="?", default=None,
                        help="config YAML" + (f" (default {default})" if default else ""))
        sp.add_argument("--config", dest="config_flag", metavar="FILE", default=None,
                        help="the config YAML, as an option")
        sp.add_argument("overrides", nargs="*", help=overrides)
        sp.add_argument("--no-progress", action="store_true")
        sp.set_defaults(config_default=default)
        return sp

    t = with_config("train", "run every stage of a config (resumes an interrupted run)")
    t.epilog = ("every config field and its default: opd-jax config show [FILE] (the resolved "
                "config, overrides applied)")
    t.add_argument("--fresh", action="store_true", help="delete the run directory first")
    t.set_defaults(fn=cmd_train)
    with_config("eval", "run only the eval stages").set_defaults(fn=cmd_eval)
    s = with_config("sample", "generate from the student (or --teacher)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--teacher", action="store_true")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_sample)
    a = sub.add_parser("analyze", help="plots and markdown summary of a run directory")
    a.add_argument("run_dir")
    a.set_defaults(fn=cmd_analyze)
    for name, help_ in (("rank-prompts", "rank a prompt pool by teacher confidence / correctness "
                         "and student-teacher divergence; dedupe against held-out prompts"),
                        ("select-prompts", "former name of rank-prompts")):
        with_config(name, help_, "configs/select_demo.yaml",
                    "key.sub=value (select.* for the select section)").set_defaults(
                        fn=cmd_rank_prompts)
    al = with_config("align-prompts", "the OPD paper's teacher-aligned prompts: rank a pool by "
                     "similarity to the teacher's post-training prompts, build the deduplicated "
                     "control set", overrides="align.key=value overrides")
    al.add_argument("--texts-only", action="store_true",
                    help="only write both sets' matching texts (to embed elsewhere, e.g. mpnet)")
    al.set_defaults(fn=cmd_align_prompts)
    st = with_config("study", "the OPD paper's comparisons on the default teacher",
                     "configs/study_demo.yaml", "key.sub=value (study.*, select.* sections)")
    st.add_argument("--small", action="store_true", help="tiny random models, a few steps")
    st.add_argument("--fresh", action="store_true", help="delete the study directory first")
    st.set_defaults(fn=cmd_study)
    b = with_config("build-cold-start", "the OPD paper's off-policy cold start: teacher rollouts "
                    "kept by the rejection filters (re-sampled up to max_attempts draws per slot), "
                    "written as the JSONL a cold_start stage with dataset: trains on")
    b.add_argument("--stage", default=None,
                   help="the cold_start stage to build for (default: the first with dataset:)")
    b.add_argument("--out", default=None, help="output JSONL (default: the stage's dataset)")
    b.add_argument("--batch-rows", type=int, default=None,
                   help="rollouts per sampler call (default: batch_prompts x num_teacher_samples)")
    b.add_argument("--force", action="store_true", help="replace an existing dataset")
    b.set_defaults(fn=cmd_build_cold_start)
    sv = with_config("serve-teacher", "serve the config's teacher over HTTP (a trainer uses it "
                     "with teacher.source: http://HOST:PORT)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="interface to bind (default localhost only; 0.0.0.0 for other hosts: "
                    "set a shared secret in $OPD_JAX_TEACHER_TOKEN first)")
    sv.add_argument("--port", type=int, default=8471)
    sv.add_argument("--k-max", type=int, default=64, help="largest top-k a client may ask for")
    sv.add_argument("--token-env", default="OPD_JAX_TEACHER_TOKEN",
                    help="environment variable holding the shared secret (unset: no token)")
    sv.add_argument("--max-request-mb", type=float, default=64.0,
                    help="refuse request bodies above this size")
    sv.set_defaults(fn=cmd_serve_teacher)
    ct = with_config("cache-teacher", "score a cold-start dataset with the config's teacher once "
                     "and write its top-k as ArrayRecord shards (distill stages train from it)")
    ct.add_argument("--out", required=True, help="cache directory (resumed when it exists)")
    ct.add_argument("--dataset", default=None,
                    help="JSONL to score (default: the config's cold_start dataset)")
    ct.add_argument("--k", type=int, default=64, help="teacher top-k ids kept per token")
    ct.add_argument("--batch-rows", type=int, default=16)
    ct.add_argument("--force", action="store_true", help="rebuild from scratch")
    ct.set_defaults(fn=cmd_cache_teacher)
    d = with_config("demo", "distil the embedded default teacher (configs/demo.yaml)",
                    "configs/demo.yaml")
    d.add_argument("--fresh", action="store_true", default=True)
    d.set_defaults(fn=cmd_demo)
    c = sub.add_parser("config", help="print a resolved config: every field, defaults included",
                       description="opd-jax config show [FILE] [key.sub=value ...]: the config "
                       "`opd-jax train FILE` would run (YAML), or the schema's defaults without FILE")
    c.add_argument("action", choices=("show",))
    c.add_argument("file", nargs="?", default=None)
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=cmd_config)
    e = sub.add_parser("export", help="write a run's student as a Hugging Face folder or a GGUF")
    e.add_argument("run_dir", help="the run directory `opd-jax train` wrote (e.g. runs/demo)")
    e.add_argument("out", help="output folder (--to hf) or .gguf file (--to gguf)")
    e.add_argument("--to", choices=("hf", "gguf"), default="hf")
    e.add_argument("--stage", default=None, help="train stage (default: the last with a checkpoint)")
    e.add_argument("--step", type=int, default=None, help="saved step (default: the stage's latest)")
    e.add_argument("--lora-only", action="store_true",
                   help="PEFT adapters (+ the base as a HF folder when it is not one already)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="HF weight dtype (default: the student's training dtype)")
    e.add_argument("--gguf-type", choices=("f32", "f16", "q8_0"), default="f16")
    e.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="split model.safetensors above this size (GB)")
    e.add_argument("--force", action="store_true", help="replace an existing output")
    e.set_defaults(fn=cmd_export)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("opd_jax")
    except Exception:  # noqa: BLE001 - a source checkout that was never installed
        return "0.1.0 (not installed)"


def _resolve_config(parser: argparse.ArgumentParser, args) -> None:
    """``args.config`` from the positional or the ``--config`` spelling (or the command's
    default); a positional that is really a ``key=value`` override goes back to the overrides."""
    positional = args.config
    if positional is not None and "=" in positional and not Path(positional).exists():
        args.overrides = [positional, *args.overrides]
        positional = None
    if positional is not None and args.config_flag is not None and positional != args.config_flag:
        parser.error(f"two configs given ({positional} and --config {args.config_flag}); pass one")
    args.config = args.config_flag or positional or args.config_default
    if args.config is None:
        parser.error(f"{args.command} needs a config: opd-jax {args.command} configs/demo.yaml "
                     "(or --config configs/demo.yaml)")


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line: overrides may follow ``--flags``; ``args.config`` resolved."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow --flags
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if hasattr(args, "config_flag"):
        _resolve_config(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        # config / data / model / export errors: a clear message, no traceback
        print(f"opd-jax: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # a teacher service that is gone or refuses the run (opd_jax.teacher.client)
        if "TeacherServiceError" not in {c.__name__ for c in type(e).__mro__}:
            raise
        print(f"opd-jax: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if type(e).__name__ != "MissingExtraError":   # opd_jax.checks (not imported here: light CLI)
            raise
        print(f"opd-jax: error: {e}", file=sys.stderr)
        return 2


def entry() -> int:
    """The ``opd-jax`` command: :func:`main` after restarting once with glibc malloc tunables that
    keep freed memory for reuse (:func:`opd_jax.train.host_memory.reexec_with_tuned_malloc`;
    ``OPD_JAX_MALLOC=0`` skips it). Tests and other Python callers use :func:`main`, which never
    restarts the process. Before jax starts, XLA CPU is told to schedule every program for the
    smallest live set (:func:`opd_jax.compile_options.memory_scheduler_env`)."""
    import os

    from opd_jax.compile_options import memory_scheduler_env
    from opd_jax.train.host_memory import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()
    if (env := memory_scheduler_env(os.environ)) is not None:
        os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
