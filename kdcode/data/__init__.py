"""Data: corpora and their file-level splits (``corpus``), JSON-lines records and hub datasets (``records``), the
CodeXGLUE py150 normalisation (``py150``), the fill-in-the-middle training transform (``fim``) and byte-level BPE
tokenizers (``bpe``)."""
