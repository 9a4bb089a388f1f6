"""natgrad's curvature inside other libraries; each integration is an optional extra, imported
on use: :mod:`natgrad.integrations.laplace` (laplace-torch backend, extra ``laplace``)."""
