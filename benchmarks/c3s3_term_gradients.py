"""Gradient norm of each of C3S3's loss terms on each network's parameters, at a checkpoint of a trained run (issue 20's
investigation of C3S3-2D collapsing at ACDC-lite 5 %, docs/pairs.md).

Usage: python benchmarks/c3s3_term_gradients.py RUN_DIR [--checkpoint last] [--batches 2]
Rebuilds the run from its config and splits (no training, nothing written), loads the checkpoint's modules, draws
training batches as the run did, and prints per batch the winner, both supervised losses, ΣL_iuc and
‖∇ term‖ over network 1's and network 2's parameters for L_sup, cos_weight·L_cos, λ·L_cp and
2·odcl_weight·ΣL_iuc (the terms as they enter the loss; the shared ODCL term reaches each network twice, as in the
method).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ssmis.eval.run_eval import load_run, restore_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--checkpoint", default="last")
    ap.add_argument("--batches", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg, _ = load_run(a.run)
    if cfg.method["name"] != "c3s3":
        raise SystemExit(f"{a.run} is a {cfg.method['name']} run, not c3s3")
    _, _, trainer, state = restore_run(a.run, a.checkpoint)
    for module in trainer.ctx.modules.values():
        module.train()
    step, method = int(state.get("step", 0)), trainer.method
    print(f"{a.run.name}, checkpoint {a.checkpoint} (step {step})")
    for b in range(a.batches):
        lb, ub = trainer._batches()
        t = method.terms(lb, ub, step)
        norms = []
        for k, net in enumerate((method.net1, method.net2)):
            params = [p for p in net.parameters() if p.requires_grad]
            for label, term in (("sup", t.sup[k]), ("cos", t.cos_weight * t.cos[k]), ("cp", t.w * t.cp[k]),
                                ("2*iuc", 2 * t.odcl_weight * t.iuc)):
                if not term.requires_grad:
                    norms.append(f"net{k + 1} {label} 0")
                    continue
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
                norms.append(f"net{k + 1} {label} {norm.item():.3g}")
        print(f"  batch {b}: winner net{t.winner + 1}, L_sup {t.sup[0].item():.3f} / {t.sup[1].item():.3f}, "
              f"ΣL_iuc {t.iuc.item():.2f} | " + ", ".join(norms))


if __name__ == "__main__":
    main()
