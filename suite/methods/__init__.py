"""The method SDK: the Pruner contract, registry, capture, layer-wise reconstruction, OBS, mask learning."""
