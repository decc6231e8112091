"""CoOp: learn the context words of CLIP's prompt, keep CLIP frozen.

Paper: "Learning to Prompt for Vision-Language Models", Zhou, Yang, Loy, Liu; IJCV 2022, arXiv 2109.01134.
Idea: replace the hand-written "a photo of a" in "a photo of a {class}." by M learnable word vectors shared by all
classes, and train only them with cross-entropy over CLIP's image-text cosine logits. At test time the learned
prompt is filled with any class names: trained on base classes, evaluated on base and on unseen new classes.

    python coop.py                                            # the built-in offline world, CPU, seconds
    python coop.py --epochs 0                                 # zero-shot CLIP (each dataset's template), same split
    python coop.py --dataset eurosat --root ~/data            # a real benchmark with OpenAI's ViT-B/16
    python coop.py --dataset eurosat dtd --root ~/data --seed 1 2 3   # 6 runs one after the other, then the table
    python coop.py --setting crossdataset --root ~/data       # ImageNet -> the 10 other datasets and the 4 variants
    python coop.py --dataset eurosat --root ~/data --resume   # continue an interrupted run from its last epoch

Defaults are the CoOp re-run of the CaPT paper (ViT-B/16, context "a photo of a", 16 shots, 10 epochs, batch 4,
SGD lr 0.0035, one warm-up epoch at 1e-5, then per-epoch cosine). CoOp's own base-to-new recipe is
`--batch-size 32 --lr 0.002 --epochs 200` (`vit_b16_ctxv1`).

Deviations from the official code (KaiyangZhou/CoOp): the context is an fp32 parameter (the official default
creates it in fp16 and updates it with SGD); the text encoder runs only up to the longest prompt (exact);
text and test-image features are computed once per evaluation rather than per test batch; --ctx-init's context is
as many vectors as the words' tokens (the official code counts words: 'itap of a' is 4 tokens, 3 words, so it
keeps 'it ap of' and drops 'a'; the two agree for the default "a photo of a"). Left out: CoOp's
class-specific context (CSC), which has no context for unseen classes and so no place in base-to-new.

Dimension legend: B batch, C classes, M context tokens, T text tokens (<= 77), D text width, E joint embedding.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import data
import eval as evaluation
import experiment
import files
import harness

parser = experiment.parser("CoOp: learned prompt context for CLIP", epochs=10, batch_size=4, lr=0.0035,
                           recipe="CaPT's CoOp re-run")
experiment.add_frozen_feature_flags(parser)
# method
parser.add_argument("--ctx-init", default="a photo of a", help="words the context starts from ('' = random init); one vector per token (official: per word)")
parser.add_argument("--n-ctx", type=experiment.positive_int, default=4, help="context length when --ctx-init is '' (CoOp paper: 16)")
parser.add_argument("--warmup-lr", type=experiment.non_negative, default=1e-5, help="constant learning rate of the warm-up epoch")
parser.add_argument("--momentum", type=experiment.fraction, default=0.9, help="SGD momentum (Dassl default)")
parser.add_argument("--weight-decay", type=experiment.non_negative, default=5e-4, help="SGD weight decay (Dassl default)")
parser.add_argument("--ensemble", action="store_true", help="with --epochs 0: CLIP's prompt ensemble (CoOp's ZeroshotCLIP2)")
# CoOp's IMAGENET_TEMPLATES_SELECT (7 of the CLIP paper's ImageNet templates); ZeroshotCLIP2 adds the dataset's own
ENSEMBLE = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
            "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


class PromptLearner(nn.Module):
    """Builds the C prompts [SOS] ctx_1 .. ctx_M name_1 .. name_n . [EOS] as token embeddings (C, T, D)."""

    def __init__(self, model, classnames, ctx_init="a photo of a", n_ctx=4):
        super().__init__()
        if ctx_init:
            n_ctx = len(clip.tokenize(ctx_init)[0].nonzero()) - 2  # tokens between SOS and EOS
            with torch.no_grad():
                init = model.token_embedding(clip.tokenize(ctx_init).to(model.positional_embedding.device))
            ctx = init[0, 1:1 + n_ctx].float()  # (M, D)
        else:
            ctx = torch.randn(n_ctx, model.token_embedding.embedding_dim) * 0.02  # (M, D), CoOp's N(0, 0.02^2)
        self.ctx = nn.Parameter(ctx)  # (M, D); fp32 whatever the encoder's dtype
        self.n_ctx = n_ctx
        self.set_classnames(model, classnames)

    def set_classnames(self, model, classnames):
        """Token embeddings of everything around the context, for this class list (rebuilt, never saved)."""
        placeholder = " ".join(["X"] * self.n_ctx)
        tokens = clip.tokenize([f"{placeholder} {c}." for c in classnames]).to(self.ctx.device)  # (C, 77)
        self.eot_idx = tokens.argmax(dim=-1)  # (C,)
        T = int(self.eot_idx.max()) + 1  # exact truncation: nothing after the last EOS is ever attended to
        with torch.no_grad():
            embedding = model.token_embedding(tokens[:, :T]).float()  # (C, T, D)
        self.register_buffer("prefix", embedding[:, :1], persistent=False)  # (C, 1, D)  [SOS]
        self.register_buffer("suffix", embedding[:, 1 + self.n_ctx:], persistent=False)  # (C, T-1-M, D)

    def forward(self):
        ctx = self.ctx.expand(self.prefix.shape[0], -1, -1)  # (C, M, D)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, T, D)


def text_features(model, prompt_learner, autocast):
    """(C, E) normalised features of the learned prompts."""
    with autocast():
        features = model.encode_token_embeddings(prompt_learner(), prompt_learner.eot_idx)
    return F.normalize(features.float(), dim=-1)


def step_loss(prompt_learner, model, features, labels, autocast):
    """(loss, logits) of one batch of raw image features (B, E): cross-entropy over CLIP's scaled cosine logits."""
    logit_scale = model.logit_scale.exp().float()
    image_features = F.normalize(features, dim=-1)  # (B, E)
    logits = logit_scale * image_features @ text_features(model, prompt_learner, autocast).t()  # (B, C)
    return F.cross_entropy(logits, labels), logits


def train(module, model, split, args, *, device, autocast):
    """SGD over the module's trainable tensors with Dassl's schedule; one line per epoch; a snapshot at each end."""
    transform = split.train_transform(model.visual.input_resolution)
    batches = experiment.training_batches(model, split.train, transform, args.batch_size, seed=args.seed,
                                          device=device, autocast=autocast, views=args.cache_views,
                                          store=evaluation.store_dir(args), dataset=args.dataset,
                                          num_workers=args.workers)
    optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    def step(inputs, labels):
        """One training step: the frozen image encoder (no gradients), the loss, backward, SGD."""
        if inputs.dim() == 4:  # images (B, 3, R, R); --cache-views hands stored features (B, E) instead
            with torch.no_grad(), autocast():
                inputs = model.encode_image(inputs).float()  # (B, E)
        loss, logits = step_loss(module, model, inputs, labels, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits
    if args.cuda_graph:
        step = harness.cuda_graph(step, optimizer)  # the same step, captured once per learning rate and replayed
    start, _ = experiment.resume(args.out, module, optimizer) if args.resume else (0, {})
    for epoch in range(start, args.epochs):
        lr = experiment.lr_at_epoch(epoch, args.lr, args.epochs, args.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        meter = experiment.Meter()
        for inputs, labels in experiment.progress(batches(epoch), f"epoch {epoch + 1}/{args.epochs}"):
            loss, logits = step(inputs, labels)
            meter.add(loss, logits, labels)
        print(f"epoch {epoch + 1}/{args.epochs}  {meter.summary(epoch, lr)}")
        experiment.snapshot(args.out, module, optimizer, epoch, meter=meter)


@torch.no_grad()
def evaluate(model, prompt_learner, test, args, *, device, autocast):
    """Accuracy of the learned prompts on one test set: text features once, image features once (or from the store).
    Zero-shot CLIP (nothing trained) uses each dataset's own hand-crafted template instead, as the papers' tables."""
    if args.method.startswith("zero-shot"):  # ensemble: the mean of each template's unit features, renormalised
        templates = ENSEMBLE + [test.template] * (test.dataset != "imagenet") if args.ensemble else [test.template]
        with autocast():
            weights = F.normalize(torch.stack([evaluation.zeroshot_weights(model, test.classnames, t, device)
                                               for t in templates]).mean(0), dim=-1)  # (C, E)
    else:
        prompt_learner.set_classnames(model, test.classnames)
        weights = text_features(model, prompt_learner, autocast)  # (C, E)
    features, labels = evaluation.stored_test_features(model, test, args, device=device,
                                                       autocast=autocast)  # (N, E) raw, (N,)
    return evaluation.accuracy(F.normalize(features, dim=-1) @ weights.t(), labels)


def configure(args):
    """The run's name: this file's (coop; a copy is a method of its own), or zero-shot CLIP when nothing is trained
    (scored with each dataset's own template)."""
    if args.epochs == 0:  # the ensemble is a row of its own (CoOp's ZeroshotCLIP2 beside ZeroshotCLIP)
        args.method = "zero-shot-ensemble" if args.ensemble else "zero-shot"


def run(args):
    """One run (one dataset, one seed): load CLIP frozen, train the context, then score every test set."""
    if args.ensemble and args.method != "zero-shot-ensemble":
        raise files.InputError("--ensemble is zero-shot CLIP's prompt ensemble: use it with --epochs 0")
    split = data.prepare_for(args)
    experiment.check_prompts(split, args.ctx_init or " ".join(["X"] * args.n_ctx))  # CLIP reads 77 tokens: checked now
    device, autocast = experiment.start(args, split)  # seeded; autocast: bf16 for the frozen CLIP on CUDA, fp32 on CPU
    model, _ = clip.load(args.backbone, device=device)
    model.requires_grad_(False)  # CLIP stays frozen: only the prompt learner trains
    if args.compile:
        model = harness.compile_encoders(model)
    prompt_learner = PromptLearner(model, split.classnames, ctx_init=args.ctx_init, n_ctx=args.n_ctx).to(device)
    experiment.show_trainable(prompt_learner)
    if args.eval_only:
        experiment.load_checkpoint(args.out, prompt_learner)
    else:
        train(prompt_learner, model, split, args, device=device, autocast=autocast)
        experiment.save_checkpoint(args.out, prompt_learner, split)
    accs = {name: evaluate(model, prompt_learner, test, args, device=device, autocast=autocast)
            for name, test in split.tests.items()}
    return evaluation.results(split, accs)


def main(argv=None):
    return harness.main(parser, configure, run, argv)


if __name__ == "__main__":
    main()
