"""Where text comes from: the dataset catalog, local files and Hub sources (read through `datasets`), the embedded
corpora, and the evaluation sets."""
