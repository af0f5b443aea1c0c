"""Images as compressed networks: sizing, quantisation, entropy coding, the .kimg format, and
rate–distortion comparisons with JPEG / WebP / AVIF.

    fit (kanimg.train) → quantise + fine-tune (quantize, qat) → entropy-code (entropy)
    → .kimg file (kimg, bitstream) → decode on any machine (bitstream.decode_image)
"""
