"""The official weights: reading PyTorch checkpoints safely (`checkpoint`), downloading and
caching them (`download`), the official <-> Keras mapping (`mapping`), resizing the relative
position bias tables for other windows (`resize`) and the registry of official checkpoints
with their converted cache (`pretrained`)."""
