"""CP-LRP on torchvision's ViT, and AttnLRP on one attention block, against LXT (AttnLRP's reference implementation),
where it is installed.

LXT 2.1 (the PyPI release) needs transformers < 4.55 (its BERT patch imports a function later releases removed), which
this project does not depend on. Install both into a folder of their own and point the test at it:

    pip install --no-deps --target /some/dir "lxt==2.1" "transformers==4.54.1" "huggingface_hub>=0.34,<1.0" "tokenizers>=0.21,<0.22" regex
    LRP_SCRATCH_LXT_PATH=/some/dir python -m pytest -q tests/test_lxt_parity.py

LXT's `cp_LRP` patch map for `torchvision.models.vision_transformer` detaches the queries and keys of every
`nn.MultiheadAttention`, applies the identity to GELU, and holds the LayerNorm's sigma constant; with the plain gradient
on the linear layers, gradient x input is then LRP-0 there. Ours with the same conventions: `Uniform(Epsilon(0.))`
(CP-LRP is the default attention rule), `CentredNorm(0.)` (LXT's LayerNorm) and `Norm(0.)` on ops with a
constant (gradient x input gives `x + c` the share x/(x+c)). The comparison runs in a subprocess, since LXT patches
torch.nn classes in place. Without the variable the test is skipped, and says so.

AttnLRP: one attention block (q, k, v projections with biases, S = q k^T / sqrt(d), softmax, A V, the out projection,
the first token, a linear head; random weights, float64) explained twice by LXT -- with its explicit functional rules
(`lxt.explicit.functional`: `linear_epsilon`, `matmul` (Prop. 3.3: epsilon, then the uniform split in halves) and
`softmax` (Prop. 3.1, with `temperature=sqrt(d)` for the scaling), relevance propagated by autograd), and with its
efficient rules (`lxt.efficient.rules.divide_gradient`: the gradient at q and k divided by 4, at v by 2, as LXT's
attention patches do; the plain gradient elsewhere, then gradient x input) -- against ours,
`Uniform(Epsilon(0.), attention_rule='attnlrp')` on the block written with plain torch ops. LXT's epsilons are set to
0 where they exist: `linear_epsilon(..., epsilon=0.)` (default 1e-6) and `matmul(..., epsilon=0.)` (default 1e-8); its
softmax rule and `divide_gradient` have none.

Gamma: LXT's own ViT recipe (its examples/vit_torch.py: the `cp_LRP` patches, `monkey_patch_zennit`, Zennit's `Gamma(0.25)`
on every `nn.Linear` and `nn.Conv2d` whose forward runs) against ours, `Uniform(Gamma(0.25))` with LXT's conventions
elsewhere: the attention's projections, which LXT's recipe leaves to the gradient (torchvision calls them inside
`F.multi_head_attention_forward`, no hook fires), get `Epsilon(0.)` by name, and the residual sums and the attention
no stabiliser. LXT's patch of Zennit's hook divides each Gamma layer's input relevance by `stabilize(x, 1e-10)`
(relative error 1e-10 / |x| per element, 1e-8 of the largest value here); the test divides by x itself, which has no
zeros here.
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIR = os.environ.get("LRP_SCRATCH_LXT_PATH")
TOL = 1e-8  # max |ours - LXT| / max |LXT| per sample, float64, LXT's GELU epsilon set to 0 (ours has none)
SHIPPED_TOL = 1e-4  # LXT as shipped: its GELU rule divides by x + 1e-10, a relative error of 1e-10 / |x| per element

# torchvision's ViT-B/16 on 64x64 inputs, float64, random head, every constant non-zero (biases, LayerNorm shifts, the
# class token): `model` and `x` of the ViT comparisons
VIT_B_16 = textwrap.dedent("""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=64).double().eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
        for n, p in model.named_parameters():  # every constant non-zero: biases, LayerNorm shifts, the class token
            if n.endswith('bias') or n.endswith('class_token'): p.normal_(0, 0.01)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
""")

SCRIPT = textwrap.dedent("""
    import json, sys, torch, torchvision
    import lxt
    assert lxt.__file__.startswith(%r), lxt.__file__
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.vit_torch import cp_LRP
    from lrp_scratch.lrp import LRPModel, Uniform, Epsilon, Norm, CentredNorm
""") + VIT_B_16 + textwrap.dedent("""
    comp = Uniform(Epsilon(0.), constant_rule=Norm(0.), norm_rule=CentredNorm(0.))
    ours, out = LRPModel(model, composite=comp).explain(x, target='pred')
    monkey_patch(torchvision.models.vision_transformer, cp_LRP)
    def lxt_relevance():
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        y.gather(1, y.argmax(1)[:, None]).sum().backward()
        return (x * xg.grad).detach(), y.detach()
    def worst(theirs): return [float((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max()) for n in range(len(x))]
    theirs, y = lxt_relevance()
    res = dict(shipped=worst(theirs), out=float((out - y).abs().max()))
    # LXT's identity rule on GELU saves f(x) / (x + 1e-10) as the gradient; with that epsilon 0 it is the identity, as ours
    from lxt.efficient.rules import identity_rule_implicit_fn
    identity_rule_implicit_fn.forward.__defaults__ = (0.0,)
    res['eps0'] = worst(lxt_relevance()[0])
    print(json.dumps(res))
""")


def run_with_lxt(script: str) -> dict:
    "Run `script` (it prints one JSON line last) in a fresh interpreter with LXT's folder first on the path."
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([DIR, str(ROOT)]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", script % DIR], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(DIR is None, reason="LXT is not installed (set LRP_SCRATCH_LXT_PATH, see the module docstring)")
def test_cp_lrp_matches_lxt_on_vit_b_16():
    res = run_with_lxt(SCRIPT)
    assert res["out"] <= 1e-12, res
    assert max(res["eps0"]) <= TOL, res  # the same conventions: the same relevance, to rounding
    assert max(res["shipped"]) <= SHIPPED_TOL, res  # LXT as shipped: its GELU epsilon moves single elements


ATTN_SCRIPT = textwrap.dedent("""
    import json, torch, torch.nn as nn
    import lxt
    assert lxt.__file__.startswith(%r), lxt.__file__
    import lxt.explicit.functional as lf
    from lxt.efficient.rules import divide_gradient
    from lrp_scratch.lrp import LRPModel, Uniform, Epsilon

    class Block(nn.Module):
        "Tokens -> q, k, v -> softmax(q k^T / sqrt(d)) v -> out projection -> the first token -> logits."
        def __init__(self, d=16, heads=4, classes=5):
            super().__init__()
            self.heads, self.mode = heads, None  # mode: None (plain torch, ours), 'explicit' or 'efficient' (LXT)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.head = nn.Linear(d, classes)
        def lin(self, m, t): return lf.linear_epsilon(t, m.weight, m.bias, epsilon=0.) if self.mode == 'explicit' else m(t)
        def forward(self, x):
            split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            q, k, v = split(self.lin(self.q, x)), split(self.lin(self.k, x)), split(self.lin(self.v, x))
            dh = q.shape[-1]
            if self.mode == 'explicit':
                a = lf.softmax(lf.matmul(q, k.transpose(-2, -1), epsilon=0.), -1, temperature=dh ** 0.5)
                o = lf.matmul(a, v, epsilon=0.)
            else:
                if self.mode == 'efficient': q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
                o = torch.softmax(q @ k.transpose(-2, -1) / dh ** 0.5, dim=-1) @ v
            return self.lin(self.head, self.lin(self.o, o.transpose(1, 2).flatten(2))[:, 0])

    torch.manual_seed(0)
    block = Block().double().eval()
    with torch.no_grad():
        for n, p in block.named_parameters():
            if n.endswith('bias'): p.normal_(0, 0.1)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    ours, out = LRPModel(block, composite=Uniform(Epsilon(0.), attention_rule='attnlrp')).explain(x, target='pred')
    def lxt_relevance(mode):
        block.mode = mode
        xg = x.clone().requires_grad_(True)
        y = block(xg)
        idx = y.argmax(1, keepdim=True)
        # explicit: relevance flows backward, seeded with the target logit; efficient: the gradient, then x * gradient
        seed = torch.zeros_like(y).scatter(1, idx, y.gather(1, idx) if mode == 'explicit' else torch.ones_like(y))
        y.backward(seed.detach())
        block.mode = None
        return (xg.grad if mode == 'explicit' else x * xg.grad).detach(), y.detach()
    res = dict(out=float((out - block(x)).abs().max()), sum_over_logit=(ours.flatten(1).sum(1) / out.max(1).values).tolist())
    for mode in ('explicit', 'efficient'):
        theirs, y = lxt_relevance(mode)
        res[mode] = [float((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max()) for n in range(len(x))]
        res[mode + '_out'] = float((out - y).abs().max())
    # a check that can fail: CP-LRP (our default attention rule) is not what LXT's AttnLRP rules give
    cp = LRPModel(block, composite=Uniform(Epsilon(0.))).explain(x, target='pred')[0]
    res['cp_vs_explicit'] = [float((cp[n] - theirs[n]).abs().max() / theirs[n].abs().max()) for n in range(len(x))]
    print(json.dumps(res))
""")


@pytest.mark.skipif(DIR is None, reason="LXT is not installed (set LRP_SCRATCH_LXT_PATH, see the module docstring)")
def test_attnlrp_matches_lxt_on_one_attention_block():
    res = run_with_lxt(ATTN_SCRIPT)
    assert res["out"] <= 1e-12 and res["explicit_out"] <= 1e-12 and res["efficient_out"] <= 1e-12, res
    assert max(res["explicit"]) <= TOL, res  # LXT's explicit AttnLRP rules, epsilons 0
    assert max(res["efficient"]) <= TOL, res  # LXT's efficient AttnLRP (divide_gradient, gradient x input)
    assert min(res["cp_vs_explicit"]) >= 1e-3, res  # the comparison tells the two attention rules apart


GAMMA_SCRIPT = textwrap.dedent("""
    import json, torch, torch.nn as nn, torchvision
    import lxt
    assert lxt.__file__.startswith(%r), lxt.__file__
    import zennit.rules as zr
    from zennit.composites import LayerMapComposite
    from lxt.efficient import monkey_patch, monkey_patch_zennit
    from lxt.efficient.models.vit_torch import cp_LRP
    from lxt.efficient.rules import identity_rule_implicit_fn
    from lrp_scratch.lrp import LRPModel, Uniform, Gamma, Epsilon, Norm, CentredNorm, CPAttention
""") + VIT_B_16 + textwrap.dedent("""
    # LXT's recipe gives Zennit's Gamma to the nn.Linear and nn.Conv2d modules whose forward runs; the attention's
    # projections are called inside F.multi_head_attention_forward (no hook fires): the plain gradient, LRP-0
    attn = {f'encoder.layers.encoder_layer_{i}.self_attention.linear_{j}': Epsilon(0.) for i in range(12) for j in (2, 3)}
    # LXT's residual sums and attention are the plain gradient: no stabiliser there (ours defaults to 1e-6 unless epsilon)
    comp = Uniform(Gamma(0.25), constant_rule=Norm(0.), norm_rule=CentredNorm(0.), sum_rule=Norm(0.),
                   attention_rule=CPAttention(0.), name_map=attn)
    ours, out = LRPModel(model, composite=comp).explain(x, target='pred')
    plain = LRPModel(model, composite=Uniform(Epsilon(0.), constant_rule=Norm(0.), norm_rule=CentredNorm(0.))).explain(x, target='pred')[0]
    monkey_patch(torchvision.models.vision_transformer, cp_LRP)
    monkey_patch_zennit()
    identity_rule_implicit_fn.forward.__defaults__ = (0.0,)  # LXT's GELU rule without its epsilon (ours has none)
    # its patch of Zennit's hooks divides each Gamma layer's input relevance by stabilize(x, 1e-10) (gradient x input):
    # a relative error of 1e-10 / |x| per element; x itself (no stabiliser) where no x is 0, as here
    import lxt.efficient.zennit_patches as zp
    zp.stabilize = lambda t, epsilon=0., **kw: t
    lxt_comp = LayerMapComposite([(nn.Conv2d, zr.Gamma(0.25)), (nn.Linear, zr.Gamma(0.25))])
    lxt_comp.register(model)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    y.gather(1, y.argmax(1)[:, None]).sum().backward()
    lxt_comp.remove()
    theirs = (x * xg.grad).detach()
    worst = lambda a: [float((a[n] - theirs[n]).abs().max() / theirs[n].abs().max()) for n in range(len(x))]
    print(json.dumps(dict(gamma=worst(ours), lrp0_vs_gamma=worst(plain), out=float((out - y.detach()).abs().max()))))
""")


@pytest.mark.skipif(DIR is None, reason="LXT is not installed (set LRP_SCRATCH_LXT_PATH, see the module docstring)")
def test_gamma_matches_lxt_recipe_on_vit_b_16():
    res = run_with_lxt(GAMMA_SCRIPT)
    assert res["out"] <= 1e-12, res
    assert max(res["gamma"]) <= TOL, res  # Zennit's five-pass Gamma in LXT's recipe: the same relevance, to rounding
    assert min(res["lrp0_vs_gamma"]) >= 1e-3, res  # the comparison tells Gamma from LRP-0
