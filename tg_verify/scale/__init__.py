"""Registry scale: where batch work runs (executors), how much memory a job needs, and the Ray back end.

`executor` holds the small interface every back end implements and the local one; `ray_executor`
(imported only when asked for) runs the same jobs as Ray tasks; `memory` estimates a fingerprint's
working set from the safetensors headers, so a scheduler can place it. Docs: docs/scale.md.
"""
