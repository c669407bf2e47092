"""The preference-pair dataset (WORKDIR/pairs): record format, TFDS metadata, the training reader."""
