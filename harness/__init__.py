"""The run harness: what a method reader can skip. A method script calls three names of it:

    harness.main(parser, configure, run)       # every (dataset, seed) of a command line: folders, reuse, torchrun
    harness.cuda_graph(step, optimizer)        # --cuda-graph: the method's own training step, captured and replayed
    harness.compile_encoders(model)            # --compile: torch.compile the frozen encoders' blocks

runs.py plans a command's runs and prints the table; folders.py names a run's folder, records its arguments and code
and decides whether a finished run can be reused; lock.py gives a run folder to one process at a time; torchrun.py
spreads runs over processes; speed.py holds the CUDA graph and compile wrappers.
"""
from harness.runs import main  # noqa: F401
from harness.speed import compile_encoders, cuda_graph  # noqa: F401
