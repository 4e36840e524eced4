"""Reference index and lineage search: thousands of references, retrieved by signature, tested exactly.

`signature` turns a lineage sketch into a short vector for retrieval; `store` is the index on disk
(versioned, validated when read); `build` adds, removes and verifies references (in parallel jobs);
`search` short-lists by signature and runs the full lineage test on the short list. Docs: docs/scale.md.
"""
