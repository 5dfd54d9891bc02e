"""CP-LRP on torchvision's ViT against LXT (AttnLRP's reference implementation), where it is installed.

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
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIR = os.environ.get("LRP_SCRATCH_LXT_PATH")
TOL = 1e-8  # max |ours - LXT| / max |LXT| per sample, float64, LXT's GELU epsilon set to 0 (ours has none)
SHIPPED_TOL = 1e-4  # LXT as shipped: its GELU rule divides by x + 1e-10, a relative error of 1e-10 / |x| per element

SCRIPT = textwrap.dedent("""
    import json, sys, torch, torchvision
    import lxt
    assert lxt.__file__.startswith(%r), lxt.__file__
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.vit_torch import cp_LRP
    from lrp_scratch.lrp import LRPModel, Uniform, Epsilon, Norm, CentredNorm
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=64).double().eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
        for n, p in model.named_parameters():  # every constant non-zero: biases, LayerNorm shifts, the class token
            if n.endswith('bias') or n.endswith('class_token'): p.normal_(0, 0.01)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
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


@pytest.mark.skipif(DIR is None, reason="LXT is not installed (set LRP_SCRATCH_LXT_PATH, see the module docstring)")
def test_cp_lrp_matches_lxt_on_vit_b_16():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([DIR, str(ROOT)]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", SCRIPT % DIR], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["out"] <= 1e-12, res
    assert max(res["eps0"]) <= TOL, res  # the same conventions: the same relevance, to rounding
    assert max(res["shipped"]) <= SHIPPED_TOL, res  # LXT as shipped: its GELU epsilon moves single elements
