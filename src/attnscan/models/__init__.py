"""Models: a spec (embedded name, .gguf file, local directory, hub id) becomes a LoadedModel exactly once; GGUF
conversion to a safetensors cache; architecture facts and anatomy.
"""
