"""FLOPs of the CNCL networks, counted analytically from the layers (the numerator of MFU).

For each Conv2D ``2 * H_out * W_out * k_h * k_w * C_in / groups * C_out`` per example (Dense:
``2 * C_in * C_out`` per position). Bias, normalisation, activations, pooling, up-sampling,
concatenation, losses and the optimizer are not counted: MFU measures the convolutions, and time
spent on the rest shows up as a lower MFU. One training step (``CNCLGAN.train_step``, LSGAN + L1,
``adv_weight > 0``) counts

    3 * G_fwd + 7 * D_fwd

* G: forward + backward, the backward costing 2 forwards (input and weight gradients) -> 3 G_fwd;
* D: forward on the real and the fake triplet (2), backward of both for D's update (2 x 2), and
  the input-gradient pass through D(fake) that carries the adversarial loss back to G (1) -> 7.

Source: the 2-FLOP-per-multiply-accumulate convention and the "backward = 2 forwards" rule of
Kaplan et al. 2020 (Scaling laws, sec. 2.1) and Chowdhery et al. 2022 (PaLM, app. B, MFU);
:func:`graph_conv_flops` cross-checks the count against the Conv2D ops of the traced TF graph.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

import ctio

FLOPS_CONVENTION = (
    "FLOPs = 2*H_out*W_out*kh*kw*C_in/groups*C_out per Conv2D (2*C_in*C_out per position for "
    "Dense), forward, per example, from the layer shapes; bias, norm, activations, pooling, "
    "up-sampling, concat, losses and optimizer not counted. Train step = 3*G_fwd + 7*D_fwd "
    "(G fwd+bwd, bwd = 2 fwd; D fwd on real and fake = 2, D bwd on both for its update = 4, "
    "adversarial input-gradient through D(fake) to G = 1). Inference = G_fwd. "
    "MFU = counted FLOP/s / FLOP/s of the square matmul of the same precision, timed "
    "in turn with the row (interleaved pairs).")


def conv_flops(model, input_shape: tuple[int, ...]) -> tuple[int, list[dict]]:
    """Forward FLOPs of ``model`` for ONE example of ``input_shape`` (without batch), by layer.

    Walks the functional graph (nested functional models and Sequential included) with
    concrete shapes, without running the model. Conv2D: ``2 * H_out * W_out * kh * kw *
    C_in / groups * C_out``; Conv2DTranspose: ``2 * H_in * W_in * kh * kw * C_in * C_out``;
    Dense: ``2 * C_in * C_out`` per position. Everything else counts 0.

    Returns ``(total, rows)`` with one row ``{"layer", "kind", "in", "out", "flops"}`` per
    counted layer (``layer`` is the path through nested models, e.g. ``content_unet/enc0_a_conv``).
    """
    import keras

    rows: list[dict] = []

    def count(layer, in_shape, out_shape, prefix):
        if isinstance(layer, keras.layers.Conv2DTranspose):
            kh, kw = layer.kernel_size
            flops = 2 * in_shape[1] * in_shape[2] * kh * kw * in_shape[-1] * layer.filters
            kind = "Conv2DTranspose"
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            groups = int(getattr(layer, "groups", 1) or 1)
            flops = 2 * out_shape[1] * out_shape[2] * kh * kw * (in_shape[-1] // groups) \
                * layer.filters
            kind = "Conv2D"
        elif isinstance(layer, keras.layers.Dense):
            positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
            flops = 2 * positions * in_shape[-1] * layer.units
            kind = "Dense"
        else:
            return
        rows.append({"layer": prefix + layer.name, "kind": kind, "in": list(in_shape[1:]),
                     "out": list(out_shape[1:]), "flops": int(flops)})

    def walk(model, inputs, prefix):
        if isinstance(model, keras.Sequential):
            model = model._functional  # Sequential wraps a functional graph
        if not hasattr(model, "_run_through_graph"):
            raise ValueError(f"{model.name}: only functional / Sequential models can be counted")

        def operation_fn(op):
            if isinstance(op, keras.Model):
                return lambda *a, **k: walk(op, a[0], prefix + op.name + "/")

            def spec(*a, **k):
                out = op.compute_output_spec(*a, **k)
                x = a[0] if a else next(iter(k.values()))
                if isinstance(op, (keras.layers.Conv2D, keras.layers.Conv2DTranspose,
                                   keras.layers.Dense)):
                    count(op, tuple(x.shape), tuple(out.shape), prefix)
                return out

            return spec

        return model._run_through_graph(inputs, operation_fn=operation_fn)

    x = keras.KerasTensor((1, *map(int, input_shape)), dtype="float32")
    walk(model, [x], "")
    return sum(r["flops"] for r in rows), rows


def graph_conv_flops(fn: Callable, spec) -> int:
    """Cross-check: FLOPs of the Conv2D ops in the TF graph of ``fn`` traced for ``spec``.

    ``2 * prod(output) * kh * kw * C_in`` per Conv2D op (batch included), divided by the batch.
    """
    tf = ctio.import_tensorflow()
    graph = tf.function(fn).get_concrete_function(spec).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            out = op.outputs[0].shape.as_list()
            kh, kw, cin, _ = op.inputs[1].shape.as_list()
            total += 2 * int(np.prod(out)) * kh * kw * cin
    return total // int(spec.shape[0])


def train_step_flops(g_fwd: int, d_fwd: int, adversarial: bool = True) -> int:
    """FLOPs of one ``CNCLGAN.train_step`` per example: ``3 G + 7 D`` (``3 G`` without D)."""
    return 3 * g_fwd + (7 * d_fwd if adversarial else 0)


def model_flops(cfg: dict, h: int, w: int) -> dict:
    """Forward FLOPs per example of the generator and discriminator of ``cfg`` at ``h x w``."""
    import Mymodel

    gen, disc = Mymodel.build_models(cfg)
    g, _ = conv_flops(gen, (h, w, 1))
    d, _ = conv_flops(disc, (h, w, 3))
    return {"g_fwd": g, "d_fwd": d, "train_step": train_step_flops(g, d)}
