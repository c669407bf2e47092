"""External image datasets -> the pair dataset: readers, image preprocessing, the VAE encoder."""
