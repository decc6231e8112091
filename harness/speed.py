"""Speed features that wrap a method's code without changing what it computes: a training step captured in a CUDA
graph (`cuda_graph`), and torch.compile on the frozen encoders' blocks (`compile_encoders`). Both are opt-in flags
(--cuda-graph, --compile); a method's train() calls `cuda_graph(step, optimizer)` on the step it wrote itself.
"""
import torch

import clip


def cuda_graph(step, optimizer, warmup=3):
    """step(inputs, labels) -> (loss, logits), the same function captured in a CUDA graph and replayed (GraphedStep)."""
    return GraphedStep(step, optimizer, warmup)


class GraphedStep:
    """A training step (forward, backward and optimizer step of one batch) captured in one CUDA graph and replayed:
    one launch instead of hundreds of small kernels (the step at C = 100 classes is launch-bound).

    Exact by construction: a replay runs the kernels the eager step launches, with the same arguments, so it gives the
    same logits and updates (tests/test_speed.py: on a CPU, the captured function against the eager step bit for bit;
    on CUDA, real replays against eager steps). What a graph cannot do, and what this class does about it:
    - Python values are frozen at capture. The learning rate is one of them (SGD's foreach kernels take it as a host
      scalar; a tensor lr is read back to the host), so the step is captured again whenever a group's lr differs from
      the captured one: once per epoch under Dassl's schedule (a per-step schedule would recapture every step).
    - Lazy state: the first `warmup` steps of each batch shape run eagerly, on a side stream as CUDA asks before a
      capture (and --compile compiles there, never inside a capture). They are real training steps and create SGD's
      momentum buffers, which the graph then updates in place. A batch of another shape is captured anew.
    - Fixed addresses: each batch is copied into static inputs; the loss and logits returned are the graph's own
      tensors, overwritten by the next step (read them before, as the Meter does).
    - The module must not change between steps (a new class list, train/eval): nothing in a training loop does.
    - Randomness (CaPT's dropout) draws from the CUDA generator's graph-safe state: each replay advances its offset
      as the eager step would.
    Without CUDA (the tests) there is no graph: the same function runs on the static inputs.
    """

    def __init__(self, step, optimizer, warmup=3):
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.calls, self.key, self.graph, self.static, self.out, self.captures = {}, None, None, None, None, 0

    def __call__(self, inputs, labels):
        shapes = (inputs.shape, labels.shape)
        self.calls[shapes] = self.calls.get(shapes, 0) + 1
        if self.calls[shapes] <= self.warmup:
            return self.eager(inputs, labels)
        key = (shapes, [group["lr"] for group in self.optimizer.param_groups])
        if key != self.key:
            self.capture(inputs, labels)
            self.key = key
        else:
            self.static[0].copy_(inputs)
            self.static[1].copy_(labels)
        if self.graph is None:  # no CUDA: the captured function itself
            return self.step(*self.static)
        self.graph.replay()
        return self.out

    def eager(self, inputs, labels):
        """One uncaptured step (on CUDA on a side stream, as capture requires of the warm-up steps)."""
        if not inputs.is_cuda:
            return self.step(inputs, labels)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(inputs, labels)
        torch.cuda.synchronize()  # the outputs were made on the side stream; nothing may reuse their memory early
        return out

    def capture(self, inputs, labels):
        """Record the step on static copies of inputs and labels (on the CPU: just keep the copies)."""
        self.graph, self.out = None, None  # free the previous capture's memory first
        self.static = (inputs.clone(), labels.clone())
        self.captures += 1
        if inputs.is_cuda:
            self.optimizer.zero_grad(set_to_none=True)  # backward then allocates the gradients from the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels without running them; replay runs them
                self.out = self.step(*self.static)


def compile_encoders(model, backend="inductor"):
    """--compile: torch.compile the forward of every transformer block of both encoders, in place. Blocks of one
    width share one compiled graph; text blocks run the math attention (the rule in clip/model.py), which inductor
    fuses. DA-VPT runs the blocks' parts itself, so only its frozen calls (k-means features) are compiled."""
    for block in model.modules():
        if isinstance(block, clip.model.ResidualAttentionBlock):
            block.compile(backend=backend)
    return model
