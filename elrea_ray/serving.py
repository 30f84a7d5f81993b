"""The routed ensemble as a serving engine, without Ray: loading and checking a bundle, routing
and decoding requests. `elrea_ray/openai_api.py` turns OpenAI bodies into `GenRequest`s and
results into OpenAI responses; `serve_apps/elrea_app.py` wraps both in a Ray Serve deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from elrea_ray.bundle import BundleError, load_bundle
from elrea_ray.decoding import GenRequest, GenResult

if TYPE_CHECKING:
    from elrea_ray.decoding import Handle


ROUTING_METHODS = ("gradient", "distilled")


class Engine:
    """One backbone with the C+1 adapters, the gradient-feature extractor and the centroids."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", routing_method: str | None = None):
        """routing_method: gradient or distilled, overriding the bundle's routing.method (a
        distilled router must be in the bundle); None: the bundle's."""
        from safetensors.numpy import load_file

        from elrea_ray.config import ModelConfig
        from elrea_ray.gradients import FeatureExtractor
        from elrea_ray.model import load_adapters, load_tokenizer
        from elrea_ray.projection import ProjectorSpec

        self.root, self.bundle = load_bundle(run_dir)
        b = self.bundle
        if routing_method is not None:  # checked before the model loads
            if routing_method not in ROUTING_METHODS:
                raise BundleError(f"routing_method must be one of {', '.join(ROUTING_METHODS)}, got {routing_method!r}")
            if routing_method == "distilled" and "router" not in b:
                raise BundleError(
                    f"bundle {self.root / 'bundle.json'}: routing_method=distilled, but the run trained no "
                    "distilled router (rerun jobs/full_pipeline.py with routing.method=distilled)"
                )
        self.model_cfg = ModelConfig(**b["model"])
        self.tok = load_tokenizer(self.model_cfg)
        spec = ProjectorSpec.from_dict(b["projector"])
        self.names = list(b["adapters"])  # "base", "expert-00", ...
        # ONE backbone per replica: the C+1 adapters for decoding and the base adapter's epoch
        # checkpoint for the routing gradients all sit on it.
        self.model = load_adapters(self.model_cfg, {n: str(self.root / p) for n, p in b["adapters"].items()}, device)
        try:
            self.fx = FeatureExtractor(
                self.model_cfg,
                [str(self.root / p) for p in b["epoch_checkpoints"]],
                b["epoch_weights"],
                spec,
                device=device,
                model=self.model,
            )
        except ValueError as e:  # projector d_in does not match the adapters
            raise BundleError(f"bundle {self.root / 'bundle.json'}: {e}") from None
        if [list(x) for x in self.fx.layout] != [list(x) for x in b["parameter_layout"]]:
            raise BundleError(
                f"bundle {self.root / 'bundle.json'}: parameter_layout does not match the "
                "epoch checkpoints' LoRA parameters; the bundle and adapters are out of step"
            )
        self.centroids = load_file(str(self.root / b["centroids"]))["centroids"]
        self.routing = dict(b["routing"])
        if routing_method is not None:
            self.routing["method"] = routing_method
        self.router = None  # routing.method=distilled: the head on the prompt's pooled hidden state
        if self.routing.get("method", "gradient") == "distilled":
            from elrea_ray.distill import DistilledRouter

            self.router = DistilledRouter.load(self.root / b["router"])
            if self.router.num_experts != self.centroids.shape[0]:
                raise BundleError(
                    f"bundle {self.root / 'bundle.json'}: the router predicts "
                    f"{self.router.num_experts} experts, the bundle has {self.centroids.shape[0]}"
                )
        self.model_id = f"elrea-{self.root.name}"
        self.max_context = int(self.model_cfg.max_length)
        from elrea_ray.data import stop_ids

        self.stop_ids = stop_ids(self.tok)  # eos and the template's end-of-turn token
        from elrea_ray.decoding import DecodeLoop

        # one continuous-batching loop per replica; the app sets max_batch_size and starts it
        self.loop = DecodeLoop(
            self.model, self.names, self.tok, self.stop_ids, route=self._weights, describe=self._routing_info
        )

    # -- requests -----------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.model_id, *self.names]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from elrea_ray.data import render_prompt

        return render_prompt(self.tok, messages)

    def encode_text(self, prompt: str) -> list[int]:
        # A completion continues the raw text: no chat template, the tokenizer's own special
        # tokens (a BOS where the model expects one). Routing then sees this raw text.
        return list(self.tok(prompt)["input_ids"])

    # -- routing and decoding -----------------------------------------------------------------
    def route(self, prompt_ids: list[list[int]], top_k: list[int | None]) -> np.ndarray:
        """[B, 1+C] weights (column 0 = base) from the instructions' gradient features, or with
        routing.method=distilled from the distilled router; then each request's top_k (the
        bundle's when None) and the bundle's min_weight."""
        from elrea_ray.routing import route, sparsify

        if self.router is None:
            feats = self.fx.features(prompt_ids)
            dense = None
        else:
            dense = self.router.predict(self._pooled(prompt_ids))
        out = np.zeros((len(prompt_ids), 1 + self.centroids.shape[0]))
        for k in set(top_k):
            rows = [i for i, t in enumerate(top_k) if t == k]
            sparse = {
                "top_k": k if k is not None else self.routing.get("top_k"),
                "min_weight": self.routing.get("min_weight", 0.0),
            }
            if dense is None:
                ew, bw = route(feats[rows], self.centroids, temperature=self.routing["temperature"], **sparse)
            else:
                ew, bw = sparsify(dense[0][rows], dense[1][rows], **sparse)
            out[rows, 0], out[rows, 1:] = bw, ew
        return out

    def _pooled(self, prompt_ids: list[list[int]]) -> np.ndarray:
        """[B, H] pooled hidden states of the prompts under the base adapter, for the distilled
        router. Its own forward, not the prefill's: the loop needs the weights before the prefill
        (they decide which (prompt, adapter) rows it runs, and a sparse route may drop the base
        row), and the prefill keeps only the last position's hidden state. One forward without a
        backward, against the gradient router's forward and backward per epoch checkpoint."""
        from elrea_ray.distill import pooled_hidden_states

        self.model.set_adapter("base")  # the feature extractor sets its own adapter before each use
        return pooled_hidden_states(self.model, prompt_ids, self.loop.pad_id)

    def _weights(self, reqs: list[GenRequest]) -> np.ndarray:
        w = np.zeros((len(reqs), len(self.names)))
        routed = [i for i, r in enumerate(reqs) if r.adapter is None]
        if routed:
            w[routed] = self.route([reqs[i].prompt_ids for i in routed], [reqs[i].top_k_experts for i in routed])
        for i, r in enumerate(reqs):
            if r.adapter is not None:
                w[i, self.names.index(r.adapter)] = 1.0
        return w

    def _routing_info(self, w: np.ndarray, adapter: str | None) -> dict:
        experts = {n: float(x) for n, x in zip(self.names[1:], w[1:])}
        top = sorted(experts, key=experts.get, reverse=True)[:3]
        return {
            "base_weight": float(w[0]),
            "expert_weights": experts,
            "top_clusters": top,
            "forced_adapter": adapter,
            "adapters_run": [n for n, x in zip(self.names, w) if x != 0],
        }

    # -- the decode loop ------------------------------------------------------------------------
    def submit(self, req: GenRequest, sink) -> Handle:
        """Queue a request on the continuous-batching loop (`elrea_ray.decoding`); raises
        InvalidRequest when a field is wrong; `sink` receives its events from the loop thread."""
        return self.loop.submit(req, sink)

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Decode requests to their ends (stepping in this thread unless the loop thread runs)."""
        return self.loop.generate(reqs)
