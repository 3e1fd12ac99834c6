"""The data a run reads, in modules split by what they need (docs/data.md):

    builtin    the built-in IDX data sets: their names, where their files are found, IDX reading
    images     one image made one array row (`Fit`, `fit_image`)
    prepared   the prepared format: dataset.json, read and checked
    prepare    `vae-dist prepare`, the one writer of the prepared format
    splits     the splits training and evaluation read (torch)

Only `splits` needs torch. This file imports nothing, so the others load without it.
"""
