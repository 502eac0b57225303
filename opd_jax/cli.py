"""``opd-jax``: train | eval | sample | analyze | demo | select-prompts | study.

    opd-jax train configs/demo.yaml [key.sub=value ...] [--fresh]
    opd-jax eval  configs/demo.yaml [overrides]     # the config's eval stages on its student
    opd-jax sample configs/demo.yaml --prompt "What is 2+3?" [--teacher]
    opd-jax analyze runs/demo                        # PNG plots + summary.md
    opd-jax demo                                     # train configs/demo.yaml, then analyze
    opd-jax select-prompts --config configs/select_demo.yaml [select.rule.top_n=16]
    opd-jax study --config configs/study_demo.yaml [--small] [--fresh]
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
    summary = run(cfg, progress=not args.no_progress)
    if mesh_lib.is_primary():
        print(format_summary(summary))
        report = write_report(cfg.run_dir)
        print(f"\nreport: {report}")
    return 0


def cmd_eval(args) -> int:
    from opd_jax.train.run import format_summary, run

    cfg = _load(args)
    evals = tuple(s for s in cfg.stages if s.kind == "eval")
    if not evals:
        raise SystemExit(f"{args.config} has no eval stage; add one, e.g. "
                         "stages: [{kind: eval, n_prompts: 40}]")
    cfg = dataclasses.replace(cfg, stages=evals)
    print(format_summary(run(cfg, progress=not args.no_progress)))
    return 0


def cmd_sample(args) -> int:
    from opd_jax.data import PromptTemplate
    from opd_jax.sampling.generation import generate
    from opd_jax.train.models import build_models

    cfg = _load(args)
    models = build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    tok = models.tokenizer
    prompt = tok.encode(tok.apply_chat_template(
        PromptTemplate(student_template="{problem}").student({"prompt": args.prompt}),
        add_generation_prompt=True))
    if args.teacher:
        model = models.teacher
    else:
        from opd_jax.model.loading import Model

        params, lora = models.student.params_and_lora(models.trainable, models.frozen)
        model = Model(models.student.config, params, tok, lora)
    out = generate(model, [prompt], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed, eos_ids=tok.eos_ids)
    print(tok.decode(out.tokens[0]))
    return 0


def cmd_analyze(args) -> int:
    from opd_jax.analyze import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_select_prompts(args) -> int:
    from opd_jax.select_prompts import load_select_config, select_prompts

    cfg, sel = load_select_config(args.config, args.overrides)
    summary = select_prompts(cfg, sel, progress=not args.no_progress)
    print(f"selected {summary['selected_count']} of {summary['pool']} prompts; "
          f"report: {summary['out_dir']}/report.md")
    return 0


def cmd_study(args) -> int:
    from opd_jax.study import load_study_config, run_study

    cfg, study, sel = load_study_config(args.config, args.overrides, small=args.small)
    summary = run_study(cfg, study, sel, progress=not args.no_progress, fresh=args.fresh)
    for f in summary["findings"]:
        print(f"{f['id']} {f['finding']}: {f['verdict']}")
    print(f"report: {summary['out_dir']}/report.md")
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
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, help_, default=None, overrides="key.sub=value overrides"):
        # the config is positional, or a --config option when it has a default
        sp = sub.add_parser(name, help=help_)
        if default is None:
            sp.add_argument("config")
        else:
            sp.add_argument("--config", default=default)
        sp.add_argument("overrides", nargs="*", help=overrides)
        sp.add_argument("--no-progress", action="store_true")
        return sp

    t = with_config("train", "run every stage of a config (resumes an interrupted run)")
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
    with_config("select-prompts", "score, dedupe and select OPD prompts", "configs/select_demo.yaml",
                "key.sub=value (select.* for the select section)").set_defaults(fn=cmd_select_prompts)
    st = with_config("study", "the OPD paper's comparisons on the default teacher",
                     "configs/study_demo.yaml", "key.sub=value (study.*, select.* sections)")
    st.add_argument("--small", action="store_true", help="tiny random models, a few steps")
    st.add_argument("--fresh", action="store_true", help="delete the study directory first")
    st.set_defaults(fn=cmd_study)
    d = with_config("demo", "distil the embedded default teacher (configs/demo.yaml)",
                    "configs/demo.yaml")
    d.add_argument("--fresh", action="store_true", default=True)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow --flags
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except ValueError as e:  # config / data / model errors: a clear message, no traceback
        print(f"opd-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
