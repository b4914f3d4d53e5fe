"""The PyTorch "Model ensembling" tutorial, run with vensemble's drop-in functorch API.

Ten MLPs are run on MNIST-sized random data two ways: each model on its own minibatch
(option 1) and all models on one shared minibatch (option 2); both are checked against a
Python loop over the models and timed against it. Runs on CUDA when present, else on CPU.

    python examples/model_ensembling.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from vensemble import Ensemble, combine_state_for_ensemble, vmap


class SimpleMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def main(quick: bool = False) -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_models = 10
    data = torch.randn(100, 64, 1, 28, 28, device=device)
    models = [SimpleMLP().to(device) for _ in range(num_models)]

    # Option 1: a different minibatch for each model.
    minibatches = data[:num_models]
    predictions_diff_minibatch_loop = [model(mb) for model, mb in zip(models, minibatches)]
    # Option 2: the same minibatch for every model.
    minibatch = data[0]
    predictions2 = [model(minibatch) for model in models]

    fmodel, params, buffers = combine_state_for_ensemble(models)
    for p in params:
        p.requires_grad_()
    print([p.size(0) for p in params])  # the leading dimension is the number of models
    assert minibatches.shape == (num_models, 64, 1, 28, 28)

    predictions1_vmap = vmap(fmodel)(params, buffers, minibatches)
    assert torch.allclose(
        predictions1_vmap, torch.stack(predictions_diff_minibatch_loop), atol=1e-3, rtol=1e-5
    )
    predictions2_vmap = vmap(fmodel, in_dims=(0, 0, None))(params, buffers, minibatch)
    assert torch.allclose(predictions2_vmap, torch.stack(predictions2), atol=1e-3, rtol=1e-5)

    # The same with vensemble's Ensemble, an nn.Module that owns the stacked state.
    ens = Ensemble(models)
    assert torch.allclose(
        ens(minibatches, in_dims=0), torch.stack(predictions_diff_minibatch_loop), atol=1e-5
    )
    assert torch.allclose(ens(minibatch), torch.stack(predictions2), atol=1e-5)

    # Gradients reach the stacked parameters.
    predictions1_vmap.sum().backward()
    assert all(p.grad is not None for p in params)

    scope = {"models": models, "minibatches": minibatches, "vmap": vmap, "fmodel": fmodel}
    scope |= {"params": params, "buffers": buffers, "zip": zip, "ens": ens}
    runs = 5 if quick else 100
    without_vmap = Timer("[model(mb) for model, mb in zip(models, minibatches)]", globals=scope)
    with_vmap = Timer("vmap(fmodel)(params, buffers, minibatches)", globals=scope)
    with_ensemble = Timer("ens(minibatches, in_dims=0)", globals=scope)
    print(f"Predictions without vmap {without_vmap.timeit(runs)}")
    print(f"Predictions with vmap {with_vmap.timeit(runs)}")
    print(f"Predictions with vensemble.Ensemble {with_ensemble.timeit(runs)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time 5 runs instead of 100")
    main(parser.parse_args().quick)
