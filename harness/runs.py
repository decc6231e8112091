"""A command line -> its runs: one per dataset and seed, each in its own folder, reused when finished with the same
arguments and code, spread over the ranks under torchrun, and the setting's table at the end (`main`)."""
import sys
from pathlib import Path

import torch

import clip
import data
import eval as evaluation
import experiment
import files
from harness import torchrun
from harness.folders import code_of, resolve, reusable, run_one, scored_elsewhere, variant, writable
from harness.lock import claimed


def plan(parser, configure, script, argv=None):
    """(the parsed flags, one resolved Namespace per (dataset, seed) run) of a command line, each with its folder
    and the code that makes it.

    configure(args) may rename the method (args.method starts as the script's file name) and fills the flags the
    user left unset from the method's presets (it raises ValueError for a combination that makes no sense); what is
    still unset then takes the parser's recipe.
    """
    args = parser.parse_args(argv)
    datasets = args.dataset or (["imagenet"] if args.setting == "crossdataset" else ["world"])
    unknown = [d for d in datasets + (args.targets if args.setting == "crossdataset" else [])
               if d not in data.DATASETS and d != "folder"]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(data.DATASETS)} or 'folder'")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu (or auto)")
    if getattr(args, "cuda_graph", False) and not experiment.device_and_autocast(args.device, "fp32")[0].startswith("cuda"):
        parser.error("--cuda-graph needs a CUDA device (--device cuda)")
    if args.backbone != "auto" and args.backbone not in clip.available_models() and \
            not Path(args.backbone).expanduser().is_file():
        parser.error(f"--backbone {args.backbone!r} is neither a file nor one of {clip.available_models()}")
    if args.precision == "fp16" and not args.eval_only:
        parser.error("--precision fp16: training in fp16 needs loss scaling, which nanoprompt does not do (its "
                     "gradients can underflow); train with bf16 (the default on CUDA) or fp32, or use fp16 with --eval-only")
    code = code_of(script)
    jobs = [resolve(parser, configure, args, d, s, script) for d in datasets for s in args.seed]
    for one in jobs:
        one.variant = variant(parser, configure, args, one, script)
        one.code = code
        vars(one).update(experiment.split_record(one))  # the split files it trains and tests on, compared for reuse
        name = f"shots{one.shots}_seed{one.seed}" + (f"_{one.variant}" if one.variant else "")
        one.out = args.out if args.out and len(jobs) == 1 else str(
            Path(args.out or Path.cwd() / "runs" / one.method) / one.setting / one.dataset / name)
        try:  # a file in the way of a folder the run writes: say so now, not after training
            writable(one.out, "--out")
            if getattr(one, "store", "none") != "none":
                writable(evaluation.store_dir(one), "--store")
        except files.InputError as e:
            parser.error(str(e))
    return args, [scored_elsewhere(one, parser.neutral) or one for one in jobs]  # --eval-only on other test sets


def main(parser, configure, run, argv=None):
    """Every (dataset, seed) asked for, one after the other, each in its own folder; finished runs with the same
    arguments and code are reused; the setting's table at the end. run(args) trains and scores one run, returns its
    results; its module's file is the method's script (its name names the runs, its code is recorded).
    Bad input (files.InputError, or a backbone clip.load refuses) ends the command with one `error:` line, exit 2.

    Under torchrun with several processes the runs are spread over the ranks instead (see torchrun.spread): each
    rank does its share, and rank 0 prints the table once every rank has finished."""
    ranks = torchrun.torchrun_ranks()
    script = sys.modules[run.__module__].__file__
    one = None  # the run in progress, for the message of Ctrl-C
    try:
        args, jobs = plan(parser, configure, script, argv)  # bad input found while planning is one line too
        if ranks:
            results = torchrun.spread(run, jobs, parser.neutral, *ranks)
        else:
            results = []
            for one in jobs:
                with claimed(one.out):  # one process per run folder at a time
                    finished = reusable(one, parser.neutral)
                    results.append(finished if finished is not None else run_one(run, one))
    except KeyboardInterrupt:
        if one is None:
            sys.exit(130)
        print(f"\ninterrupted: {one.out} is not finished; the same command with --resume continues it from its last "
              f"finished epoch (runs already finished are reused)", file=sys.stderr)
        sys.exit(130)
    except files.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except clip.LoadError as e:
        print(f"error: --backbone {args.backbone}: {e}", file=sys.stderr)
        sys.exit(2)
    runs_dir = Path(args.out) if args.out else Path.cwd() / "runs" / jobs[0].method / args.setting
    if len(jobs) > 1 and (not ranks or ranks[0] == 0):
        results_found = evaluation.read_results(runs_dir)
        if evaluation.collect(results_found, args.setting):
            print(f"\n{evaluation.TABLES[args.setting](results_found)}")
    return results[0] if len(jobs) == 1 else results
