"""`diffseg train VERB`: training of the embedded models."""
from ..training import fit_layer_weights, train_head, train_ldmseg, train_sd


def add_parser(subparsers):
    parser = subparsers.add_parser('train', help='train the embedded models (resumable)')
    verbs = parser.add_subparsers(dest='train_verb', required=True, metavar='VERB')
    train_sd.add_parser(verbs)
    train_ldmseg.add_parser(verbs)
    train_head.add_parser(verbs)
    fit_layer_weights.add_parser(verbs)
