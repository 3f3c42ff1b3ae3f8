"""Where offloaded weights live and how their bytes come back: the offload store, mapped pages, page-cache folios, direct reads, pinned buffers and the files weights are views of."""
