"""Encoders: the family registry (registry.py, the only place that names every family), the
interface a family provides (base.py), layers more than one family uses (layers.py), and one
package per family: seed/ (config, model, weights, processor, gpu_decode, family) and qwen/
(config, checkpoint, processor, layers, towers, family). seed and qwen never import each other."""
