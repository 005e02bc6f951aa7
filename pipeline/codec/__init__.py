"""The codec: the QINCo model, beam search, encoder, decoders, IVF and RQ initialisation (plain PyTorch/NumPy/Faiss), and the model file."""
