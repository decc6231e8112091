"""Linear-probe CLIP: logistic regression on frozen CLIP image features, the baseline row of CoOp's few-shot tables.

Paper: CLIP (Radford et al., ICML 2021, arXiv 2103.00020) Sec. 3.2; as CoOp (arXiv 2109.01134) runs it: lpclip/.
Idea: encode the few-shot training images once with CLIP's frozen image encoder (the test transform, no
augmentation), fit an L2-regularised multinomial logistic regression on the features, and choose its
regularisation C on a few-shot validation split: CoOp's grid 1e6 .. 1e-6, then 8 steps that halve the log-range
around the best C. Closed set: the probe knows only its training classes, so it has no base-to-new row.

    python lpclip.py --shots 16                              # the world, seconds
    python lpclip.py --dataset eurosat --root ~/data --shots 1 --seed 1 2 3

As CoOp's code: unnormalised image embeddings (encode_image); val shots = min(shots, 4); sklearn's
LogisticRegression(solver="lbfgs", max_iter=1000) objective, C * sum of cross-entropies + 0.5 * ||W||^2 (bias not
penalised), solved here with torch's L-BFGS in float64 (no sklearn). Deviations: the validation images are drawn
by data.fewshot with the run's seed (CoOp: numpy's stream after the train draw); a dataset without a validation
split (the world) draws them from the training images the few-shot sample left out.

Dimension legend: N images, E joint embedding, C classes.
"""
import torch
import torch.nn.functional as F

import clip
import data
import eval as evaluation
import experiment
import harness
from files import InputError

parser = experiment.parser("Linear-probe CLIP (CoOp's lpclip)", epochs=0, batch_size=0, lr=0, recipe="not trained by SGD")
experiment.add_frozen_feature_flags(parser)  # --store: the test features, shared with the text-side methods
parser.set_defaults(setting="fewshot")  # the probe's row is a few-shot one (CoOp's tables)
parser.add_argument("--search-steps", type=experiment.natural, default=8, help="C search steps after the grid (CoOp: 8)")
parser.add_argument("--max-iter", type=experiment.positive_int, default=1000, help="L-BFGS iterations (sklearn/CoOp: 1000)")
C_GRID = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]  # CoOp's initial search list, in its order (ties: the first)


def fit_logistic(x, y, num_classes, C, max_iter=1000):
    """(W (C, E), b (C,)) minimising C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2, sklearn's lbfgs objective, divided
    by C * N as sklearn divides it (same minimiser), stopped as sklearn stops (max |gradient| <= tol 1e-4)."""
    x = x.double()
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, tolerance_grad=1e-4, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.t() + b, y) + 0.5 * (W * W).sum() / (C * len(y))
        loss.backward()
        return loss
    opt.step(objective)
    return W.detach(), b.detach()


def predict(classifier, x):
    W, b = classifier
    return (x.double() @ W.t() + b).argmax(1)  # (N,)


def search_c(fit, val_acc, steps=8):
    """CoOp's C search: the best of C_GRID on the validation split (first on ties), then `steps` rounds comparing
    C/10-ish left and right ends; the better (left on ties) is kept and the log-range halves toward it.
    fit(C) -> classifier, val_acc(classifier) -> accuracy. Returns (C, classifier) of the last round."""
    accs = [val_acc(fit(c)) for c in C_GRID]
    best = C_GRID[accs.index(max(accs))]
    left, right = best / 10, best * 10
    chosen = (best, fit(best))
    for _ in range(steps):
        clf_l, clf_r = fit(left), fit(right)
        lo, hi = torch.tensor([left, right]).double().log10().tolist()
        if val_acc(clf_l) < val_acc(clf_r):
            chosen, (lo, hi) = (right, clf_r), ((lo + hi) / 2, hi)
        else:
            chosen, (lo, hi) = (left, clf_l), (lo, (lo + hi) / 2)
        left, right = 10 ** lo, 10 ** hi
    return chosen


def validation_items(args, train_items):
    """min(shots, 4) validation images per class: the dataset's val split, else the train images not sampled."""
    ds = data.load_dataset(args.dataset, args.root)
    taken = {it.path for it in train_items}
    pool = ds.val or [it for it in ds.train if it.path not in taken]
    if args.shots == "all" and not ds.val:
        raise InputError(f"{args.dataset} has no validation split and --shots all leaves no image to choose C on; "
                         f"use --shots 1..16")
    return pool if args.shots == "all" else data.fewshot(pool, min(args.shots, 4), args.seed)


def configure(args):
    """The probe scores only its training classes: base-to-new (new classes) and cross-dataset are refused."""
    if args.setting != "fewshot":
        raise ValueError(f"a linear probe cannot score classes it was not trained on (--setting {args.setting}); "
                         f"use --setting fewshot (CoOp's tables have it as a few-shot row)")


def run(args):
    """One run: frozen features of the few-shot train, val and test images, the C search, the test accuracy."""
    split = data.prepare_for(args)
    val_items = validation_items(args, split.train)
    device, autocast = experiment.start(args, split)
    model, _ = clip.load(args.backbone, device=device)
    model.requires_grad_(False)
    test = split.tests["all"]
    tf = test.transform(model.visual.input_resolution)  # CoOp's feat_extractor: the test transform everywhere

    def features(items):
        return evaluation.image_features(model, data.loader(items, tf, evaluation.EVAL_BATCH, train=False),
                                         device, autocast)  # (N, E) raw, (N,)
    (x, y), (xv, yv) = features(split.train), features(val_items)
    xt, yt = evaluation.stored_test_features(model, test, args, device=device, autocast=autocast)
    C, clf = search_c(lambda c: fit_logistic(x.cpu(), y.cpu(), len(split.classnames), c, args.max_iter),
                      lambda clf: (predict(clf, xv.cpu()) == yv.cpu()).double().mean().item(), args.search_steps)
    acc = 100 * (predict(clf, xt.cpu()) == yt.cpu()).double().mean().item()
    print(f"C = {C:.4g}  val images {len(val_items)}")
    return evaluation.results(split, {"all": acc}, C=C)


def main(argv=None):
    return harness.main(parser, configure, run, argv)


if __name__ == "__main__":
    main()
