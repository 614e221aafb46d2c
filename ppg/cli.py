"""The ``ppg`` command. Each subcommand takes ``--config FILE`` and ``key.sub=value`` overrides."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ppg import console
from ppg.config import ConfigError, load_config

EXAMPLES = """examples:
  ppg config show
  ppg config show --config examples/greedy.yaml objective.policy_class.type=k_step objective.policy_class.k=2
  ppg train                                                   # the embedded default
  ppg train --config examples/greedy.yaml run.iterations=50
  ppg train --resume runs/default-20261125-120000             # continue from the latest checkpoint
  ppg eval --checkpoint runs/default-.../checkpoints/iter_000030 --problem myopic,elicitation
  ppg collect --out data/myopic.jsonl --episodes 512          # the initial model's judged episodes
  ppg train run.offline_data=data/myopic.jsonl                # offline PPG on that file
  ppg serve --checkpoint runs/default-.../checkpoints/iter_000060   # chat page http://127.0.0.1:8000/
  ppg train serve.enabled=true                                # watch it learn: http://127.0.0.1:8000/live
  ppg train --verbose                  # every library line on the terminal (else in <run>/logs/console.log)
  ppg experiment --suite experiments/paper.yaml      # classes x problems x seeds; resumable
  ppg problems
  PYTHONPATH=examples/plugins ppg train problem.name=my_problem:OneTopic problem.judge=my_problem:KeywordJudge
  ppg model build                      # build (once) and print the embedded tiny model's folder
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppg",
        description="Partial Policy Gradients for multi-turn LLM agents on Ray.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = subcommand(commands, "config", "inspect and validate configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = subcommand(
        config_commands, "show", "print the resolved config (defaults <- file <- overrides) as YAML"
    )
    add_config_arguments(show)
    show.set_defaults(handler=cmd_config_show)

    model = subcommand(commands, "model", "build or locate the configured policy model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    build = subcommand(
        model_commands,
        "build",
        "resolve model.name_or_path to a local folder (builds 'embedded:tiny' on first use) and print it",
    )
    add_config_arguments(build)
    build.set_defaults(handler=cmd_model_build)

    train = subcommand(commands, "train", "train a policy (rollouts -> PPG update -> weight broadcast)")
    add_config_arguments(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    add_verbose_argument(train)
    train.set_defaults(handler=cmd_train)

    evaluate = subcommand(
        commands,
        "eval",
        "score a checkpoint against its initial policy on held-out personas (paired; report + samples)",
    )
    add_config_arguments(evaluate)
    evaluate.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="a checkpoint (or policy) folder"
    )
    evaluate.add_argument(
        "--problem",
        action="append",
        metavar="NAME",
        help="problem name; repeat it or give a comma list for several (default: the checkpoint's)",
    )
    evaluate.add_argument(
        "--episodes", type=int, default=32, help="conversations per policy and problem (default 32)"
    )
    evaluate.add_argument(
        "--out", metavar="DIR", help="where report.json, report.md, samples.md go (default <checkpoint>/eval)"
    )
    add_verbose_argument(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    collect = subcommand(
        commands,
        "collect",
        "play a policy on the training personas, judged as in training, into an episodes file (offline PPG)",
    )
    add_config_arguments(collect)
    collect.add_argument(
        "--out", required=True, metavar="FILE", help="the episodes file to write (JSON Lines)"
    )
    collect.add_argument(
        "--checkpoint", metavar="DIR", help="a checkpoint (or policy) folder (default: model.name_or_path)"
    )
    collect.add_argument(
        "--episodes", type=int, default=256, help="a multiple of rollout.group_size (default 256)"
    )
    collect.set_defaults(handler=cmd_collect)

    serve = subcommand(commands, "serve", "serve a checkpoint as an OpenAI-compatible HTTP API (Ray Serve)")
    add_config_arguments(serve)
    serve.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint (or policy) folder")
    add_verbose_argument(serve)
    serve.set_defaults(handler=cmd_serve)

    experiment = subcommand(
        commands, "experiment", "run a suite: policy classes x problems x seeds -> tables and plots"
    )
    experiment.add_argument("--suite", required=True, metavar="FILE", help="suite YAML (experiments/*.yaml)")
    experiment.add_argument(
        "--out", metavar="DIR", help="output folder (default experiments/results/<suite name>); resumes"
    )
    experiment.add_argument(
        "--report-only", action="store_true", help="rebuild the tables and plots from finished cells"
    )
    add_verbose_argument(experiment)
    experiment.set_defaults(handler=cmd_experiment)

    problems = commands.add_parser(
        "problems",
        help="list the registered problems and which policy class should win (and how to plug in your own)",
    )
    problems.set_defaults(handler=cmd_problems)
    return parser


def subcommand(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the examples."""
    return commands.add_parser(
        name, help=help, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (default: built-in defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. objective.gamma=0.9 rollout.num_workers=2",
    )


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's, vLLM's and the workers' output on the terminal (by default it goes to a log "
        "file, named on the terminal; ppg's own lines and errors always reach the terminal)",
    )


def cmd_config_show(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_model_build(args: argparse.Namespace) -> int:
    from ppg.models import ModelPathError, resolve_model

    config = load_config(args.config, args.overrides)
    try:
        print(resolve_model(config.model.name_or_path))
    except ModelPathError as e:
        print(f"ppg: model.name_or_path: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # The cheap checks come before the driver's imports (Ray, transformers: seconds), so that a
    # mistyped field or folder is answered at once; train() checks everything again, and more.
    config = None
    if args.resume:
        from ppg.learner.checkpoint import require_checkpoints

        load_config(Path(args.resume) / "config.yaml", args.overrides)
        require_checkpoints(Path(args.resume))
    else:
        config = load_config(args.config, args.overrides)
    from ppg.driver import train

    run_dir = train(config, resume=args.resume, overrides=args.overrides if args.resume else None)
    console.say(f"run folder: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ppg.learner.checkpoint import validate_checkpoint

    # Checked before the log folder is made under it (a mistyped path must not come into being),
    # and before the evaluator's imports (seconds).
    validate_checkpoint(Path(args.checkpoint), require_trainer_state=False)
    from ppg.evaluate import evaluate, summary_lines

    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    console.capture(out / "logs" / "console.log")
    console.say(f"[ppg eval] playing {args.checkpoint} and its initial policy on held-out personas ...")
    report = evaluate(args.checkpoint, args.problem, args.episodes, args.config, args.overrides, args.out)
    console.say("\n".join(summary_lines(report)))
    console.say(f"report: {report['output_dir']}/report.md (report.json, samples.md)")
    if console.log_path():
        console.say(console.where_logs_are())
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from ppg.collect import collect
    from ppg.offline import read_header

    path = collect(args.out, args.episodes, args.checkpoint, args.config, args.overrides)
    problem = read_header(path).problem
    print(f"wrote {args.episodes} episodes to {path}")
    print(f"train on them with: ppg train problem.name={problem} run.offline_data={path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ppg.serve.cli import serve_main

    return serve_main(args.checkpoint, args.config, args.overrides, log=serve_log(Path(args.checkpoint)))


def serve_log(checkpoint: Path) -> Path:
    """Where ``ppg serve`` puts library output: the checkpoint's run folder (``<run>/logs/``) when it
    is one of a run's checkpoints, else the temp folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "config.yaml").is_file():
        return checkpoint.parent.parent / "logs" / f"serve-{stamp}.log"
    return Path(tempfile.gettempdir()) / f"ppg-serve-{stamp}.log"


def cmd_experiment(args: argparse.Namespace) -> int:
    from ppg.experiment.report import write_report
    from ppg.experiment.runner import run_suite
    from ppg.experiment.suite import load_suite

    suite = load_suite(args.suite)
    out = Path(args.out) if args.out else Path("experiments") / "results" / suite.name
    if args.report_only:
        if not write_report(suite, out):
            console.error(f"ppg: no finished cells under {out}")
            return 2
        return 0
    if log := console.capture(out / "logs" / "console.log"):
        console.say(f"[ppg experiment] library output (Ray, vLLM, workers): {log}")
    console.say(f"results: {run_suite(suite, out)}")
    return 0


def cmd_problems(args: argparse.Namespace) -> int:
    from ppg.env.problems import PROBLEMS

    for name, cls in sorted(PROBLEMS.items()):
        boundaries = f", segments start at {list(cls.default_boundaries)}" if cls.default_boundaries else ""
        if lengths := getattr(cls, "segment_lengths", None):
            boundaries = f", segments of {min(lengths)}-{max(lengths)} turns drawn per conversation"
        print(f"{name}  [{cls.family}; {cls.default_turns} turns{boundaries}; judged on {cls.aspect}]")
        print(f"  best: {cls.best_class}. {cls.why}.\n")
    print(
        "your own: problem.name=pkg.module:Class (a ppg.env.problems.Problem subclass), "
        "problem.judge=pkg.module:name, problem.partner=pkg.module:name, with the module on the "
        "Python path (README: plug-ins; examples/plugins)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(verbose=getattr(args, "verbose", False))
    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # our errors name the field and the fix
        console.error(f"ppg: {e}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; a run says how to resume in its first line
        console.error("ppg: interrupted")
        return 130
    except BaseException as e:  # the traceback: into the log, and (once released) to the terminal in full
        console.log_exception(e)
        if console.log_path():
            console.error(f"ppg: failed; the full output, library lines included, is in {console.log_path()}")
        raise
    finally:
        console.release()


if __name__ == "__main__":
    sys.exit(main())
