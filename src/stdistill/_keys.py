"""Every AnnData key stdistill reads or writes, in one table (squidpy's ``Key`` in spirit).

Code names keys through :class:`Key` (``Key.obs.section``, ``Key.obsm.features("uni")``), never
by retyping the string; ``key_added=`` renames what a function writes. Public as
:mod:`stdistill.keys`.

==========  ======================================  =================================  =========================================
slot        key                                     written by                         meaning
==========  ======================================  =================================  =========================================
``obs``     ``section``, ``patient``                readers (:mod:`stdistill.io`)      categorical ids; splits are by patient
``obs``     ``pathology``                           dataset readers                    pathologist region label
``obs``     ``patch_padded``                        ``features.extract``               the patch reached beyond its image
``obs``     ``tissue_fraction``, ``tile_row``,      ``pp.tile``                        tile's tissue share and grid position
            ``tile_col``
``obs``     ``niche``                               ``NicheTeacher.predict``           a teacher's niches, "0".."K-1"
``obs``     ``niche_pred``                          ``NicheStudent.predict``,          a student's niches from H&E alone
                                                    ``predict-slide``
``obs``     ``niche_pred_name``                     ``predict-slide``                  ``"niche 3: ERBB2/KRT19"`` labels
``obs``     ``niche_refined``                       ``students.refine_niches``         niches refined by section structure
``obs``     ``niche_teacher``, ``niche_student``    ``recipes.niches.run``             per fold: teacher on training
                                                                                       patients, student on the held-out one
``obs``     ``niche_kmeans``, ``niche_kmeans_nbr``  ``recipes.niches``                 k-means baselines (own / averaged
                                                                                       neighbourhood features)
``obs``     ``niche_true``                          ``datasets.simulated``             simulated ground truth
``obsm``    ``spatial``                             readers                            spot / tile centres (x, y), pixels
``obsm``    ``X_<encoder>``                         ``features.extract``               patch features (n, dim) float32
            (:meth:`Key.obsm.features`)
``obsm``    ``<key>_views``                         ``features.extract(views=K)``      augmented views (n, K, dim)
``obsm``    ``<key>_probs`` (``niche_probs``)       niche teachers and students        soft niches (n, K), beside ``obs[<key>]``
``obsm``    ``X_teacher``                           ``ExpressionTeacher``              teacher embeddings (n, D)
``obsm``    ``X_peka``, ``peka_pred``               ``PEKA.transform`` / ``predict``   adapted features; log1p expression
                                                                                       (DataFrame spots x genes)
``obsm``    ``pathway_scores``                      ``pp.pathway_scores``              pathway activities (DataFrame)
``obsm``    ``X_stamp``, ``pathway_pred``           ``STAMP.transform`` / ``predict``  aligned features; predicted activities
``obsm``    ``genst_pred``, ``genst_sd``,           ``GenST.predict`` / ``sample``     generated log1p expression, its SD
            ``genst_samples``                                                          over code samples, the samples
``obsm``    ``genst_patches``                       ``recipes.genst_patches``          uint8 patches (n, 3, px, px) a pixel-level
                                                                                       GenST reads
``obsm``    ``<kind>_pred`` (``genes_pred``,        ``predict-slide``                  a bundle's outputs on tiles
            ``pathways_pred``)
``obsm``    ``celltype_props``                      dataset readers                    cell-type proportions (DataFrame)
``obsm``    ``<key>_agg``                           ``pp.aggregate_neighbors``         neighbourhood-aggregated ``obsm[key]``
``obsp``    ``spatial_connectivities``,             ``pp.spatial_neighbors``,          the spot graph (squidpy's names):
            ``spatial_distances``                   ``pp.spot_graph``                  binary CSR, distances in um
``obsp``    ``spatial_<r>um_connectivities``, ...   ``pp.spot_graph``                  the graph of another radius r (um)
``uns``     ``spatial``                             readers                            per section: scalefactors, images,
                                                                                       metadata (scanpy's Visium layout)
``uns``     ``spatial_neighbors``                   ``pp.spatial_neighbors``           the graph's keys and params
                                                                                       (``radius_um``)
``uns``     ``features``                            ``features.extract``               ``{obsm key: record}`` (encoder,
                                                                                       size_um, px, precision, weights, stain)
``uns``     ``features_manifest``                   ``features.extract_manifest``      per-slide extraction record
``uns``     ``pathway_scores``                      ``pp.pathway_scores``              its params and genes per pathway
``uns``     ``niche_refined``                       ``students.refine_niches``         its params
``uns``     ``bench_expression``                    ``bench.expression``               the HEST-protocol results
``uns``     ``genst``                               ``stdistill genst sample``         genes and sampling params
``uns``     ``genst_patches``                       ``recipes.genst_patches``          their ``size_um`` and ``px``
``uns``     ``predict``                             ``predict-slide``                  the bundle record and outputs
``uns``     ``dataset``, ``simulated``              dataset readers                    dataset name; simulation settings
``layers``  ``counts``                              user data                          raw counts when ``X`` holds others
``varm``    ``celltype_profile``                    ``datasets.simulated``             expression profile per cell type
==========  ======================================  =================================  =========================================

Spellings of the parameters that name these keys: ``feature_key`` (an ``obsm`` key of features),
``batch_key`` (an ``obs`` column whose effects are removed), ``section_key`` (the ``obs`` column of
sections, where images and coordinates live), ``key_added`` (what a function writes).
"""

from __future__ import annotations


def _derived(template: str, doc: str, default: str | None = None) -> staticmethod:
    """A key made from another name: ``template.format(name)`` (``default``: the name when none is given)."""

    def key(name: str | None = default) -> str:
        return template.format(name)

    key.__doc__ = f"{doc}: ``{template.format('<name>')}``."
    return staticmethod(key)


class Key:
    """The key table (see the module docstring). Plain strings and small functions of a name."""

    class obs:
        section = "section"
        patient = "patient"
        pathology = "pathology"
        patch_padded = "patch_padded"
        tissue_fraction = "tissue_fraction"
        tile_row = "tile_row"
        tile_col = "tile_col"
        niche = "niche"
        niche_pred = "niche_pred"
        niche_refined = "niche_refined"
        niche_teacher = "niche_teacher"
        niche_student = "niche_student"
        niche_kmeans = "niche_kmeans"
        niche_kmeans_nbr = "niche_kmeans_nbr"
        niche_true = "niche_true"
        name = _derived("{}_name", "Readable labels beside the niche column ``name`` (``niche_pred_name``)")
        refined = _derived("{}_refined", "Refined niches beside the niche column ``name`` (``predict(refine=...)``)")

    class obsm:
        spatial = "spatial"
        niche_probs = "niche_probs"
        teacher = "X_teacher"
        peka = "X_peka"
        peka_pred = "peka_pred"
        pathway_scores = "pathway_scores"
        stamp = "X_stamp"
        pathway_pred = "pathway_pred"
        genst_pred = "genst_pred"
        genst_sd = "genst_sd"
        genst_samples = "genst_samples"
        genst_patches = "genst_patches"
        celltype_props = "celltype_props"
        features = _derived("X_{}", "Patch features of the encoder ``name`` (a registry name)")
        views = _derived("{}_views", "Augmented views of the features ``name``")
        probs = _derived("{}_probs", "Soft niches beside the niche column ``name``")
        prediction = _derived("{}_pred", "A bundle's output ``name`` on tiles (``predict-slide``)")
        aggregated = _derived("{}_agg", "Neighbourhood-aggregated ``obsm[name]``")

    class obsp:
        spatial_connectivities = "spatial_connectivities"
        spatial_distances = "spatial_distances"
        connectivities = _derived("{}_connectivities", "The spot graph's binary connectivities (squidpy)", "spatial")
        distances = _derived("{}_distances", "The spot graph's distances in um (squidpy)", "spatial")

    class uns:
        spatial = "spatial"
        spatial_neighbors = "spatial_neighbors"
        features = "features"
        features_manifest = "features_manifest"
        pathway_scores = "pathway_scores"
        niche_refined = "niche_refined"
        bench_expression = "bench_expression"
        genst = "genst"
        genst_patches = "genst_patches"
        predict = "predict"
        dataset = "dataset"
        simulated = "simulated"
        neighbors = _derived("{}_neighbors", "The spot graph's record (its keys and params; squidpy)", "spatial")

    class layers:
        counts = "counts"

    class varm:
        celltype_profile = "celltype_profile"


__all__ = ["Key"]
