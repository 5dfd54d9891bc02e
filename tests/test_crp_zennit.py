"""Conditional heatmaps against zennit-crp, where it is installed.

zennit-crp pins zennit<=0.4.6, which conflicts with the Zennit this project tests against, so it cannot live in the
project's environment. Install it into a folder of its own and point the test at it:

    pip install --no-deps --target /some/dir "zennit==0.4.6" zennit-crp
    LRP_SCRATCH_ZENNIT_CRP_PATH=/some/dir python -m pytest -q tests/test_crp_zennit.py

The comparison runs in a subprocess with that folder first on the path (our torch, their zennit). Without the variable
the test is skipped, and says so.
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIR = os.environ.get("LRP_SCRATCH_ZENNIT_CRP_PATH")

SCRIPT = textwrap.dedent("""
    import json, torch, zennit, crp
    from zennit.composites import EpsilonPlusFlat as ZEpsilonPlusFlat
    from crp.attribution import CondAttribution
    from lrp_scratch.models import VGG
    from lrp_scratch.lrp import LRPModel, EpsilonPlusFlat
    from lrp_scratch.crp import conditional_relevance
    assert zennit.__file__.startswith(sys_dir := %r), zennit.__file__
    torch.manual_seed(0)
    out = {}
    for bias in (False, True):
        model = VGG('A', n_classes=10, input_size=32, width=0.25, seed=0).double().eval()
        if bias:
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)): m.bias.normal_(0, 0.01)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        layer, cs = 'features.8', list(range(16))
        ours, _ = conditional_relevance(LRPModel(model, composite=EpsilonPlusFlat()), x, 3, [{layer: [c]} for c in cs])
        att = CondAttribution(model, no_param_grad=False)
        worst = 0.0
        for c in cs:
            res = att(x.clone().requires_grad_(True), [{'y': [3], layer: [c]}], ZEpsilonPlusFlat(), exclude_parallel=False)
            ref = res.heatmap  # channel-summed
            mine = ours[c].sum(1)
            for n in range(len(x)):
                worst = max(worst, float((mine[n] - ref[n]).abs().max() / ref[n].abs().max()))
        out['bias' if bias else 'no bias'] = worst
    # what zennit-crp records at the conditioned layer with exclude_parallel=True (its default), against the literal
    # relevance arriving there (the gradient of the seeded output at the layer's output, as our concept_relevance gives)
    from lrp_scratch.crp import concept_relevance
    lit = concept_relevance(LRPModel(model, composite=EpsilonPlusFlat()), x, 3, layer, normalize=False)[layer]
    res = att(x.clone().requires_grad_(True), [{'y': [3], layer: [5]}], ZEpsilonPlusFlat(), record_layer=[layer], exclude_parallel=True)
    rec = res.relevances[layer].sum((2, 3))
    out['recorded_ratio'] = float((rec[:, 5] / lit[:, 5]).mean())
    out['recorded_other_channels'] = float(rec[:, [c for c in range(rec.shape[1]) if c != 5]].abs().max())
    print(json.dumps(out))
""")


@pytest.mark.skipif(DIR is None, reason="zennit-crp is not installed (set LRP_SCRATCH_ZENNIT_CRP_PATH, see the module docstring)")
def test_conditional_heatmaps_equal_zennit_crp():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([DIR, str(ROOT)]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", SCRIPT % DIR], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    worst = json.loads(p.stdout.strip().splitlines()[-1])
    print(worst)
    for k in ('no bias', 'bias'): assert worst[k] <= 1e-12, (k, worst[k])
    # zennit-crp's record at the conditioned layer is masked and twice the relevance that arrives there (its known
    # problem on torch >= 2); ours is the literal value: the heatmaps above agree, the records do not
    assert abs(worst['recorded_ratio'] - 2.0) < 1e-9, worst
    assert worst['recorded_other_channels'] == 0.0, worst
