#!/usr/bin/env python3
"""LRP speed (and peak memory) against the plain input gradient and against Zennit, measured in one run.

    python bench/lrp.py                       # every case, speed (ResNet-50 takes minutes on a CPU)
    python bench/lrp.py --case vgg11 --reps 7 # one case
    python bench/lrp.py --memory              # peak memory of one call per method, each in a fresh process
    python bench/lrp.py --case resnet50 --reps 3   # torchvision ResNet-50, 224x224, batch 8 (slow on a CPU)
    python bench/lrp.py --device cuda --case vgg16 --batch 1   # on a GPU (LRP_SCRATCH_CUDA_KERNELS=1: its kernels), another batch
    python bench/lrp.py --case vit_b_16 --reps 3   # torchvision ViT-B/16, 224x224, batch 8: CP-LRP and AttnLRP
    python bench/lrp.py --case vit_b_16 --reps 3 --lxt-path /some/dir   # ... and LXT's own ViT recipe, in a subprocess

Cases: VGG11 on 3x32x32, batch 64, VGG16 on 3x224x224, batch 8, and ResNet-50 on 3x224x224, batch 8 (random weights,
eval mode, float32; ResNet-50 with random BatchNorm statistics, which our engine folds into the convolutions). The
baseline is the plain input gradient of the same model and batch (one forward and one backward: the cost floor of
any backpropagation-based explanation). Every repeat runs every method once, in a rotated order; reported are the
median time and the median over repeats of (method time / gradient time in the same repeat). Zennit and Captum
run when installed (they are optional; Captum's LRP is measured with its default rules). On ResNet-50 Zennit runs with
its `ResNetCanonizer` (BatchNorm merging and a `Sum` module for the residual adds: without it its relevance is wrong,
see the LRP coverage page), and only the EpsilonPlusFlat rows are measured (the other rows cost minutes there).
On ViT-B/16 (its zero-initialised head given random weights) the rows are CP-LRP and AttnLRP with epsilon on every
linear layer, CP-LRP with Gamma(0.25) on every linear layer (and the patch-embedding convolution), and CP-LRP computing
exactly LXT's recipe for ViTs (its examples/vit_torch.py: LXT's default `cp_LRP` patches, Zennit's Gamma on every Conv2d
and Linear through LXT's `monkey_patch_zennit`, which never reaches the attention's projections: torchvision calls them
inside F.multi_head_attention_forward, so they keep the gradient, LRP-0). Zennit and Captum have no attention rules and are not run on their own. With
`--lxt-path DIR` (or LRP_SCRATCH_LXT_PATH; LXT 2.1 installed there, see tests/test_lxt_parity.py) that recipe itself
is timed on the same model and input, in a subprocess with DIR first on the path (LXT patches torch.nn classes in place):
the plain gradient first, then the patched model with Zennit's composite registered per call, as the example does.
`--memory` adds it as one more process.
"zennit EpsilonPlusFlat" registers the composite (and applies the canonizer) in every call, as `with Gradient(...)`
around each call does; "(registered once)" runs on a copy of the model with the hooks registered once, the steady state.
"""
import argparse, copy, gc, json, os, statistics, subprocess, sys, time

import torch
import torch.nn as nn

from lrp_scratch.kernels import reference_kernels
from lrp_scratch.lrp import LRPModel, EpsilonPlusFlat, Uniform, Epsilon, Gamma, Norm, CentredNorm, CPAttention, classic

CASES = {"vgg11": ("vgg11", 10, 32, 64), "vgg16": ("vgg16", 1000, 224, 8), "resnet50": ("resnet50", 1000, 224, 8),
         "timm-resnet50d": ("timm:resnet50d", 1000, 224, 8), "timm-efficientnet_b0": ("timm:efficientnet_b0", 1000, 224, 8),
         "vit_b_16": ("vit_b_16", 1000, 224, 8)}
VIT = ("vit_b_16",)  # transformers: the attention rules instead of the CNN rows
SMALL = ("resnet50", "timm-resnet50d", "timm-efficientnet_b0")  # cases that measure only the gradient and the EpsilonPlusFlat rows
DEVICE, BATCH = torch.device("cpu"), None  # --device, --batch (None: the case's)
LXT_PATH = None  # --lxt-path: a folder with LXT 2.1 (and transformers < 4.55) installed
LXT_GAMMA = 0.25  # Gamma on the linear layers (and the patch embedding) for ours and LXT's recipe alike


def make_model(case):
    name, n_classes, size, bs = CASES[case]
    torch.manual_seed(0)
    if name == "vgg11":
        try:
            from lrp_scratch.models import VGG11
            model, src = VGG11(n_classes=n_classes), "lrp_scratch VGG11"
        except ImportError:
            import torchvision
            model, src = torchvision.models.vgg11(num_classes=n_classes), "torchvision vgg11"
    elif name.startswith("timm:"):
        import timm
        model, src = timm.create_model(name[5:], pretrained=False, num_classes=n_classes), f"timm {name[5:]}"
    else:
        import torchvision
        model, src = getattr(torchvision.models, name)(num_classes=n_classes), f"torchvision {name}"
    if name == "resnet50" or name.startswith("timm:"):  # random BatchNorm statistics (fresh ones are the identity): what a trained model has to fold
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    n = m.num_features
                    m.running_mean.copy_(0.1 * torch.randn(n, generator=g)); m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                    m.weight.copy_(0.5 + torch.rand(n, generator=g)); m.bias.copy_(0.1 * torch.randn(n, generator=g))
    if name in VIT:  # torchvision zero-initialises the head: every logit would be 0
        with torch.no_grad(): model.heads.head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.eval().to(DEVICE)
    x = torch.rand(BATCH or bs, 3, size, size).to(DEVICE)
    return model, x, src


def zennit_composite(case):
    "Zennit's EpsilonPlusFlat, with the canonizer the case needs."
    import zennit.composites as zc
    if CASES[case][0].startswith("resnet"):
        from zennit.torchvision import ResNetCanonizer
        return zc.EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    return zc.EpsilonPlusFlat()


def zennit_call(model, x, case):
    "One Zennit EpsilonPlusFlat explanation, registering the composite for this call."
    from zennit.attribution import Gradient
    with Gradient(model, zennit_composite(case)) as attributor:
        y = model(x)
        seed = torch.zeros_like(y).scatter(1, y.argmax(1, keepdim=True), 1.0)
        return attributor(x, seed)[1]


def methods(model, x, case="vgg11"):
    "name -> zero-argument function computing one explanation of the batch."
    out = {}

    def gradient():
        xg = x.detach().requires_grad_()
        y = model(xg)
        (g,) = torch.autograd.grad(y, xg, torch.zeros_like(y).scatter(1, y.argmax(1, keepdim=True), 1.0))
        return g
    out["gradient"] = gradient
    ours = {"ours EpsilonPlusFlat": (EpsilonPlusFlat(), 0.0, "pred"), "ours classic top_k=0.02": (classic(), 0.02, None),
            "ours classic top_k=0": (classic(), 0.0, None), "ours epsilon everywhere": (Uniform(Epsilon(1e-6)), 0.0, "pred")}
    if case in SMALL: ours = {"ours EpsilonPlusFlat": ours["ours EpsilonPlusFlat"]}
    if case in VIT: ours = {"ours CP-LRP epsilon": (Uniform(Epsilon(1e-6)), 0.0, "pred"),
                            "ours AttnLRP epsilon": (Uniform(Epsilon(1e-6), attention_rule="attnlrp"), 0.0, "pred"),
                            "ours CP-LRP, Gamma on linears": (Uniform(Gamma(LXT_GAMMA)), 0.0, "pred"),
                            "ours CP-LRP, Gamma as LXT's recipe": (lxt_like(model), 0.0, "pred")}
    for name, (comp, top_k, target) in ours.items():
        lrp = LRPModel(model, composite=comp, top_k=top_k)
        out[name] = (lambda lrp=lrp, target=target: lrp.explain(x, target=target)[0])
    # the same with the compiled kernels switched off (the PyTorch references): what the kernels buy end to end
    for name in [n for n in ("ours EpsilonPlusFlat", "ours classic top_k=0.02") if n in out]:
        def ref(f=out[name]):
            with reference_kernels(): return f()
        out[name + " (ref)"] = ref
    if case.startswith("timm-") or case in VIT: return out  # Zennit has no canonizer for timm's models: its numbers would not be LRP
    try:
        from zennit.attribution import Gradient
        out["zennit EpsilonPlusFlat"] = lambda: zennit_call(model, x, case)
        zmodel = copy.deepcopy(model)  # its own copy: the hooks stay registered, the other methods never see them
        attributor = Gradient(zmodel, zennit_composite(case))
        attributor.__enter__()  # registered once: steady-state use, as inside one `with Gradient(...)` block

        def zennit_once():
            y = zmodel(x)
            seed = torch.zeros_like(y).scatter(1, y.argmax(1, keepdim=True), 1.0)
            return attributor(x, seed)[1]
        out["zennit EpsilonPlusFlat (registered once)"] = zennit_once
    except ImportError:
        pass
    if case in SMALL: return out
    try:
        from captum.attr import LRP as CaptumLRP
        cap = CaptumLRP(model)
        out["captum LRP (defaults)"] = lambda: cap.attribute(x, target=model(x).argmax(1))
    except ImportError:
        pass
    return out


def lxt_like(model):
    """Ours with exactly what LXT's recipe computes (tests/test_lxt_parity.py checks the relevance to 1e-14): Gamma on the
    linear layers whose forward runs, the attention's projections (called inside F.multi_head_attention_forward, where no
    Zennit hook fires) with the gradient's rule, LRP-0, and no stabiliser on sums, constants, norms and attention."""
    attn = {f"encoder.layers.encoder_layer_{i}.self_attention.linear_{j}": Epsilon(0.)
            for i in range(len(model.encoder.layers)) for j in (2, 3)}
    return Uniform(Gamma(LXT_GAMMA), constant_rule=Norm(0.), norm_rule=CentredNorm(0.), sum_rule=Norm(0.),
                   attention_rule=CPAttention(0.), name_map=attn)


def lxt_recipe(model, x):
    """LXT's ViT recipe (its examples/vit_torch.py), as a zero-argument function: `cp_LRP` patches on torchvision's ViT
    classes (in place: call this only in a process of its own, with LXT importable), Zennit's Gamma on Conv2d and Linear
    registered per call, gradient x input."""
    import zennit.rules as zr
    from zennit.composites import LayerMapComposite
    from torchvision.models import vision_transformer
    from lxt.efficient import monkey_patch, monkey_patch_zennit
    monkey_patch(vision_transformer)
    monkey_patch_zennit()
    for p in model.parameters(): p.requires_grad_(False)  # as the example: no parameter gradients

    def f():
        comp = LayerMapComposite([(nn.Conv2d, zr.Gamma(LXT_GAMMA)), (nn.Linear, zr.Gamma(LXT_GAMMA))])
        comp.register(model)
        try:
            xg = x.detach().requires_grad_()
            y = model(xg)
            (g,) = torch.autograd.grad(y, xg, torch.zeros_like(y).scatter(1, y.argmax(1, keepdim=True), 1.0))
        finally:
            comp.remove()
        return x * g
    return f


LXT_CHILD = r"""
import sys, json, statistics, time, gc, torch
torch.set_num_threads({threads})
sys.path[:0] = [{lxt!r}, {bench!r}]
import lxt
assert lxt.__file__.startswith({lxt!r}), lxt.__file__
import lrp as B
B.BATCH = {batch!r}
model, x, _ = B.make_model({case!r})
fs = dict(gradient=B.methods(model, x, {case!r})['gradient'])  # before the patches: the plain gradient
def timed(f):
    for _ in range({warmup}): f()
    ts = []
    for _ in range({reps}):
        gc.collect(); t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return ts
res = dict(gradient=timed(fs['gradient']))
res['LXT recipe'] = timed(B.lxt_recipe(model, x))
print(json.dumps(res))
"""


def run_lxt(case, reps, warmup):
    "Times of the plain gradient, then of LXT's recipe, in a subprocess with LXT on the path; None without --lxt-path."
    if not LXT_PATH or case not in VIT or DEVICE.type != "cpu": return None
    bench = os.path.dirname(os.path.abspath(__file__))
    code = LXT_CHILD.format(threads=torch.get_num_threads(), lxt=LXT_PATH, bench=bench, batch=BATCH, case=case,
                            warmup=max(warmup, 1), reps=reps)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode: print(f"LXT recipe failed: {p.stderr[-500:]}"); return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_speed(case, reps, warmup):
    model, x, src = make_model(case)
    ms = methods(model, x, case)
    failed = {}
    for n in list(ms):  # a method that cannot explain this model is reported, not timed
        try: ms[n]()
        except Exception as e: failed[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"; del ms[n]
    names = list(ms)
    times = {n: [] for n in names}
    for _ in range(warmup - 1):
        for n in names: ms[n]()
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            gc.collect()
            t0 = time.perf_counter(); ms[n]()
            if DEVICE.type == "cuda": torch.cuda.synchronize(DEVICE)
            times[n].append(time.perf_counter() - t0)
    g = times["gradient"]
    print(f"\n{case}: {src}, input {tuple(x.shape)} on {DEVICE}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{reps} repeats (median)")
    w = max(28, *map(len, names))
    print(f"{'method':{w}} {'median s':>9} {'img/s':>8} {'x gradient (paired)':>20}")
    rows = {}
    for n in names:
        med = statistics.median(times[n])
        paired = statistics.median(t / gt for t, gt in zip(times[n], g))
        rows[n] = dict(median_s=med, img_s=len(x) / med, x_gradient=paired)
        print(f"{n:{w}} {med:9.3f} {len(x) / med:8.1f} {paired:20.2f}")
    for n, e in failed.items(): print(f"{n:{w}} fails on this model: {e}")
    for zn in ("zennit EpsilonPlusFlat", "zennit EpsilonPlusFlat (registered once)"):
        z = rows.get(zn)
        if z: print(f"ours EpsilonPlusFlat is {z['median_s'] / rows['ours EpsilonPlusFlat']['median_s']:.2f}x faster than {zn}")
    lxt = run_lxt(case, reps, warmup)
    if lxt:
        lg, lt = statistics.median(lxt["gradient"]), statistics.median(lxt["LXT recipe"])
        paired = statistics.median(t / gt for t, gt in zip(lxt["LXT recipe"], lxt["gradient"]))
        rows["LXT recipe (subprocess)"] = dict(median_s=lt, img_s=len(x) / lt, x_gradient=lt / lg, gradient_s=lg)
        print(f"{'gradient (LXT subprocess)':{w}} {lg:9.3f} {len(x) / lg:8.1f} {1:20.2f}")
        print(f"{'LXT recipe (subprocess)':{w}} {lt:9.3f} {len(x) / lt:8.1f} {lt / lg:20.2f}  (x its own gradient, medians)")
        for n in ("ours CP-LRP, Gamma on linears", "ours CP-LRP, Gamma as LXT's recipe"):
            ours = rows.get(n)
            if ours:  # > 1: ours faster; the second ratio divides out the load, which may change between the two processes
                print(f"LXT recipe / {n}: {lt / ours['median_s']:.2f} (medians), "
                      f"{(lt / lg) / ours['x_gradient']:.2f} (each over its own gradient)")
    return rows


MEM_CHILD = r"""
import sys, gc, torch
sys.path.insert(0, {bench!r})
import lrp as B
if {lxt!r}: sys.path.insert(0, {lxt!r})
B.BATCH = {batch!r}
model, x, _ = B.make_model({case!r})
ms = B.methods(model, x, {case!r})
f = ms[{name!r}] if {name!r} in ms else B.lxt_recipe(model, x)
del ms; gc.collect()  # the other methods' closures (and the registered Zennit copy, if not this one) are freed
f(); gc.collect()  # first call: caches (ours: modified parameters) are set up here, and counted below as 'setup'
def rss():
    for l in open('/proc/self/status'):
        if l.startswith('VmRSS'): return int(l.split()[1]) / 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM)
base = rss()
for _ in range(2): f()
peak = [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(peak - base)
"""


def run_memory(case):
    model, x, _ = make_model(case)
    names = list(methods(model, x, case)) + (["LXT recipe"] if LXT_PATH and case in VIT else [])
    bench = os.path.dirname(os.path.abspath(__file__))
    print(f"\n{case}: peak resident memory during 2 calls above the level before them (MiB), one process per method, "
          "after one warm-up call (which sets up caches such as our modified parameters)")
    res = {}
    for n in names:
        # every allocation above 64 KiB is its own mapping, returned to the OS when freed: the resident set then
        # follows the live tensors instead of what the allocator keeps cached
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        p = subprocess.run([sys.executable, "-c", MEM_CHILD.format(bench=bench, case=case, name=n, lxt=LXT_PATH, batch=BATCH)], capture_output=True,
                           text=True, env=env)
        if p.returncode: print(f"{n:28} failed: {p.stderr[-300:]}"); continue
        res[n] = float(p.stdout.split()[-1])
    g = res.get("gradient")
    for n, v in res.items(): print(f"{n:42} {v:9.0f} MiB {v / g if g else float('nan'):6.2f}x gradient")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=list(CASES) + ["all"], default="all")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (speed only)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the case's)")
    ap.add_argument("--lxt-path", default=os.environ.get("LRP_SCRATCH_LXT_PATH"),
                    help="a folder with LXT 2.1 installed: also time LXT's ViT recipe (default: $LRP_SCRATCH_LXT_PATH)")
    a = ap.parse_args()
    global DEVICE, BATCH, LXT_PATH
    DEVICE, BATCH, LXT_PATH = torch.device(a.device), a.batch, a.lxt_path
    cases = list(CASES) if a.case == "all" else [a.case]
    res = {c: (run_memory(c) if a.memory else run_speed(c, a.reps, a.warmup)) for c in cases}
    if a.json:
        with open(a.json, "w") as f: json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
