"""Optional dense-CRF refinement (T2M's settings) through pydensecrf2, imported only when used."""
import numpy as np

ITERATIONS = 10
GAUSSIAN = dict(sxy=1, compat=3)
BILATERAL = dict(sxy=67, srgb=3, compat=4)


def refine(rgb, scores, iterations=ITERATIONS):
    """Refine per-class scores [C, H, W] (channel 0 background) on the image; returns probabilities."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise RuntimeError('crf needs the pydensecrf2 package (pip install pydensecrf2)') from err
    c, h, w = scores.shape
    probs = np.clip(scores, 1e-6, None)
    probs = (probs / probs.sum(0, keepdims=True)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(**GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(rgb), **BILATERAL)
    return np.asarray(crf.inference(iterations), np.float32).reshape(c, h, w)
