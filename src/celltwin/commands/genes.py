"""``celltwin genes``: protein-language-model gene embeddings and their coverage of a data set."""

from __future__ import annotations

import argparse

from celltwin.commands._common import positive_int, progress_callback

HELP = "gene embeddings: embed proteins with a local ESM-2 model (embed), check coverage (coverage)"
DESCRIPTION = """\
embed:    run an ESM-2 checkpoint from a local directory (transformers format: config.json,
          weights, vocab.txt; nothing is downloaded) over a protein FASTA. Each isoform is
          mean-pooled over its residues (special tokens and padding excluded), then isoforms are
          averaged per gene. Output: a .safetensors table (tensor "embeddings" (G, D) + gene list).
          Needs torch and transformers, the optional extra: pip install 'celltwin[genes]'.
coverage: which genes of an .h5ad have a vector in a table (exact names, then HGNC aliases,
          previous symbols and Ensembl IDs with --hgnc); lists the missing ones.

FASTA headers (first rule that applies):
  >sp|P04637-2|P53_HUMAN ... GN=TP53 ...     UniProt: gene = GN=, isoform = accession
  >ENSP00000269305.4 pep ... gene_symbol:TP53  Ensembl peptides
  >TP53|isoform2 ...  or  >TP53 ...            symbol before '|' (or the first word)

Examples:
  celltwin genes embed --fasta proteins.fa --model esm2_t6_8M_UR50D/ -o genes.safetensors
  celltwin genes coverage genes.safetensors screen.h5ad --hgnc hgnc_genes.tsv
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="genes_command", metavar="{embed,coverage}", required=True)
    e = sub.add_parser("embed", help="embed a protein FASTA with a local ESM-2 model")
    e.add_argument("--fasta", required=True, help="protein FASTA (isoforms mapped to genes by header)")
    e.add_argument("--model", required=True, help="local ESM-2 checkpoint directory (transformers format)")
    e.add_argument("-o", "--output", required=True, help="output .safetensors table")
    e.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (8)")
    e.add_argument("--max-residues", type=positive_int, default=1022, help="truncate longer sequences (1022)")
    e.add_argument("--layer", type=int, default=-1, help="hidden layer to pool (-1 = last)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (CUDA untested here)")
    e.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("coverage", help="report which genes of a data set a table covers")
    c.add_argument("table", help="gene embedding table (.safetensors / .pt / .npy / .csv)")
    c.add_argument("data", help=".h5ad whose var_names are checked")
    c.add_argument("--gene-list", default=None, help="gene names for a .npy table")
    c.add_argument("--hgnc", default=None, help="HGNC table (hgnc_genes.tsv)")
    c.add_argument("--missing", default=None, help="write the missing gene names to this file")


def _embed(args: argparse.Namespace) -> int:
    from celltwin._output_checks import check_outputs
    from celltwin.genes import save_gene_table
    from celltwin.protein_embed import embed_fasta

    check_outputs({"-o/--output": args.output}, {"--fasta": args.fasta, "--model": args.model})
    with progress_callback("embedding proteins", "", not args.no_progress) as cb:
        table = embed_fasta(args.fasta, args.model, batch_size=args.batch_size, max_residues=args.max_residues,
                            device=args.device, layer=args.layer, progress=cb)
    save_gene_table(table, args.output)
    print(f"wrote {args.output}: {len(table.genes)} genes x {table.dim} dims")
    return 0


def _coverage(args: argparse.Namespace) -> int:
    from celltwin._io import atomic_path
    from celltwin._output_checks import check_outputs
    from celltwin.data.source import H5adSource
    from celltwin.genes import HgncIndex, align_gene_table, load_gene_table

    check_outputs(
        {"--missing": args.missing},
        {"TABLE": args.table, "DATA": args.data, "--gene-list": args.gene_list, "--hgnc": args.hgnc},
    )
    table = load_gene_table(args.table, args.gene_list)
    genes = [str(g) for g in H5adSource(args.data).var_names]
    index = HgncIndex.from_tsv(args.hgnc) if args.hgnc else None
    _, _, cov = align_gene_table(table, genes, index)
    print(cov.summary())
    if args.missing:
        with atomic_path(args.missing) as tmp:
            tmp.write_text("".join(f"{g}\n" for g in cov.missing))
        print(f"wrote {len(cov.missing)} missing gene names to {args.missing}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.genes_command == "embed":
        return _embed(args)
    return _coverage(args)
