"""Analysis layer: feature spaces and distances, family attribution, lineage evidence, the paper's studies."""
