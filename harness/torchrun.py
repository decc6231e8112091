"""Many GPUs and many machines: torchrun spreads a command's runs over its processes (ranks).

    torchrun --nproc_per_node 8 coop.py --dataset eurosat dtd --seed 1 2 3 --root ~/data

Every rank plans the same runs from the same command line. Rank 0 finds the finished ones and prepares the inputs,
all ranks encode the test sets together into the feature store, then each rank does its share of the other runs
on its own device and rank 0 prints the table. What the ranks exchange is small or lives on the CPU (run lists,
results, CPU feature shards), so one gloo process group serves CPUs and GPUs alike: NCCL would need the data on
the GPU, and its watchdog would end a rank that waits hours for the slowest one.
"""
import math
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import clip
import data
import eval as evaluation
import experiment
import files
from harness.folders import reusable, run_one
from harness.lock import claimed

WAIT = timedelta(days=7)  # longest wait for the other ranks (the slowest rank's share of the runs); a rank that

def torchrun_ranks():
    """(rank, world size, local rank) of a process that torchrun started among several; None otherwise."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) < 2 or "RANK" not in env or "LOCAL_RANK" not in env:
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])

def expected_cost(one):
    """A run's cost from its flags alone (published dataset sizes, nothing is read): the images its training
    encodes (epochs x training classes x shots) plus the test images it scores. The text side (C prompts per step
    for prompt learners) is left out: it grows with the classes too, so the big runs stay big."""
    classes, train, test = data.dataset_size(one.dataset, one.root)
    trained = math.ceil(classes / 2) if one.setting == "base2new" else classes
    shots = train / classes if one.shots == "all" else one.shots
    targets = one.targets if one.setting == "crossdataset" else []
    epochs = 0 if one.eval_only else one.epochs
    return epochs * trained * shots + test + sum(data.dataset_size(t, one.root)[2] for t in targets)

def assign(costs, world):
    """The rank of each run: greedy longest-processing-time, the costliest run first, each to the rank with the
    least cost so far (ties: the lower rank). Deterministic, so every rank computes the same assignment."""
    load, owner = [0.0] * world, [None] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner

def spread(run, jobs, neutral, rank, world, local_rank):
    """This rank's share of the runs under torchrun; returns every run's results, as `main` does without torchrun.

    1. Rank 0 checks which runs are finished (`reusable`; a conflict ends every rank with its error) and prepares
       the inputs of the others (`prepare_inputs`), then the first rank of every other machine does the same for
       its own disks: several ranks never render or download the same files at once.
    2. All ranks encode every test set the runs will score into the feature store (`shard_features`).
    3. The unfinished runs are assigned by expected cost (`assign`); each rank does its own on cuda:LOCAL_RANK (or
       the CPU), then every rank learns every result. A run with bad input stops its rank, which prints the runs it
       did not finish and waits for the others; a rank that dies makes torchrun stop them all, each printing what
       it did not finish. The same command again does only the runs without results.json (--resume: from their
       snapshots), spread over every rank.
    """
    if jobs[0].device in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise files.InputError(f"torchrun started local rank {local_rank}, but this machine has "
                                   f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        for one in jobs:
            one.device = f"cuda:{local_rank}"
    dist.init_process_group("gloo", timeout=WAIT)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # torchrun's stop: unwind, report
    try:
        return _spread(run, jobs, neutral, rank, world, local_rank)
    finally:
        dist.destroy_process_group()

def _spread(run, jobs, neutral, rank, world, local_rank):
    """`spread`'s steps 1-3, inside the process group."""
    first = {}  # a run folder asked for twice is run once
    for i, one in enumerate(jobs):
        first.setdefault(one.out, i)
    unique = [i for i, one in enumerate(jobs) if first[one.out] == i]
    verdict = [None]
    if rank == 0:
        try:
            finished = {i: r for i in unique if (r := reusable(jobs[i], neutral)) is not None}
            verdict = [(finished, None)]
            prepare_inputs([jobs[i] for i in unique if i not in finished])
        except files.InputError as e:
            verdict = [({}, str(e))]
    dist.broadcast_object_list(verdict, src=0)  # the others wait for rank 0's verdict
    finished, error = verdict[0]
    if error:
        if rank == 0:
            raise files.InputError(error)
        sys.exit(2)  # rank 0 prints the error
    pending = [i for i in unique if i not in finished]
    if local_rank == 0 and rank != 0:
        prepare_inputs([jobs[i] for i in pending])  # this machine's disks (nothing to do where they are shared)
    dist.barrier()
    shard_features([jobs[i] for i in pending], rank, world, local_rank)

    owner = assign([expected_cost(jobs[i]) for i in pending], world)
    mine = [i for i, r in zip(pending, owner) if r == rank]
    print(f"rank {rank} of {world}: {len(mine)} of the {len(pending)} runs to do", flush=True)
    done = {}
    try:
        for i in mine:
            with claimed(jobs[i].out):  # one process per run folder at a time
                done[i] = run_one(run, jobs[i], ranks=(rank, world))
    except files.InputError as e:  # bad input: this rank stops, the others finish their runs
        print(f"error: rank {rank}: {e}", file=sys.stderr)
    except BaseException:  # stopped by torchrun (another rank died), interrupted, or a bug
        _not_finished(rank, [jobs[i].out for i in mine if i not in done])
        raise
    left = [jobs[i].out for i in mine if i not in done]
    _not_finished(rank, left)
    gathered = _gather((done, left))  # waits for every rank to finish its share
    done = finished | {i: r for d, _ in gathered for i, r in d.items()}
    left = [out for _, outs in gathered for out in outs]
    if left:
        if rank == 0:
            raise files.InputError(f"{len(left)} of {len(jobs)} runs are not finished ({', '.join(left)}); "
                                  f"rerun the same command (after fixing the error above) to do only these")
        sys.exit(2)  # rank 0 prints the error
    return [done[first[one.out]] for one in jobs]

def _not_finished(rank, outs):
    if outs:
        print(f"rank {rank} did not finish: {', '.join(outs)} (the same command again does them)",
              file=sys.stderr, flush=True)

def _gather(value):
    """[the value of rank 0, of rank 1, ...] on every rank (a collective: every rank calls it)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values

def _per_dataset(jobs):
    """The first run of each dataset (one command: the same flags for all its runs but dataset and seed)."""
    firsts = {}
    for one in jobs:
        firsts.setdefault(one.dataset, one)
    return list(firsts.values())

def prepare_inputs(jobs):
    """Write once what the runs read but nobody has written yet: each dataset's files (the world rendered,
    --download fetched, the images checked: data.prepare_for), then OpenAI's weights for the datasets that are there
    (clip.load downloads them). An error is left to the runs that meet it: they report it."""
    backbones = set()
    for one in _per_dataset(jobs):
        try:
            data.prepare_for(one)
            backbones.add(one.backbone)
        except files.InputError:
            pass
    for backbone in sorted(backbones & set(clip.available_models())):
        try:
            clip.load(backbone, device="cpu")  # fetched and checked once, before the runs
        except clip.LoadError:
            pass

def shard_features(jobs, rank, world, local_rank):
    """Encode every test set the runs will score with all ranks at once into the feature store, where the runs then
    find it: ImageNet's 50,000 test images take 1/world of the time. For the methods with a frozen image encoder and
    a store (DA-VPT's test features depend on its trained prompts). Collective: every rank calls it with the same
    jobs, and every decision is taken on what all ranks see, so that they all take the same branches."""
    models = {}
    for one in _per_dataset(j for j in jobs if getattr(j, "store", "none") != "none"):
        device, autocast = experiment.device_and_autocast(one.device, one.precision)
        try:
            split = data.prepare_for(one)
            if one.backbone not in models:
                model = clip.load(one.backbone, device=device)[0]
                models[one.backbone] = model.requires_grad_(False)  # frozen: its fingerprint is computed once
        except (files.InputError, clip.LoadError):  # left to the runs, which report it
            split = None
        if not all(_gather(split is not None)):
            continue
        model = models[one.backbone]
        for test in split.tests.values():
            transform = test.transform(model.visual.input_resolution)
            key = evaluation.feature_key(model, test.items, transform, dataset=test.dataset, part=test.part,
                                         autocast=autocast)
            if not test.items or all(_gather((evaluation.store_dir(one) / f"{key}.pt").exists())):
                continue
            features, labels = sharded_image_features(model, test.items, transform, rank=rank, world=world,
                                                      device=device, autocast=autocast, num_workers=one.workers)
            if local_rank == 0:  # one writer per machine (the store may be on each machine's own disk)
                evaluation.cached_image_features(evaluation.store_dir(one), key, lambda: (features, labels))
    dist.barrier()  # the runs start once every feature is written

def sharded_image_features(model, items, transform, *, rank, world, device, autocast, num_workers=None):
    """(N, E) frozen image features and (N,) labels of items, encoded by all ranks together: rank r encodes a
    contiguous run of whole batches of EVAL_BATCH images and every rank gathers the shards, in order. Each batch is
    the batch a single process encodes, so the features are a single process's (bitwise on the CPU).
    Collective: every rank calls it with the same items."""
    batches = math.ceil(len(items) / evaluation.EVAL_BATCH)
    lo, hi = (min(len(items), evaluation.EVAL_BATCH * (batches * r // world)) for r in (rank, rank + 1))
    shard = None
    if hi > lo:
        print(f"rank {rank}: test features, shard {rank + 1}/{world} ({hi - lo} images)", flush=True)  # in any log
        loader = data.loader(items[lo:hi], transform, evaluation.EVAL_BATCH, train=False, num_workers=num_workers)
        shard = evaluation.image_features(model, loader, device, autocast,
                                          desc=f"test features, shard {rank + 1}/{world}")
    shards = [s for s in _gather(shard) if s is not None]  # [((n_r, E), (n_r,))] in rank order
    return torch.cat([f for f, _ in shards]), torch.cat([y for _, y in shards])  # (N, E), (N,)
