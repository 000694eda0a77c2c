"""A burst of frames much faster than the model builds no backlog: only the newest frame is kept."""
import time

from ros_harness import make_image

BURST = 100
FIRST = 10_000


def all_frames_accounted(values):
    """Tell whether no frame is waiting or in progress: each one was processed or dropped."""
    done = sum(int(values[key]) for key in ('frames processed', 'frames dropped', 'frames rejected',
                                            'frames failed', 'frames without query'))
    return int(values['frames received']) == done


def test_burst_is_dropped_not_queued(launcher):
    node = launcher.start()
    assert node.send_query('red mug', expect=['red mug']) is not None
    semantic = node.outputs['semantic']
    assert node.send_images_until(semantic, first_index=0)[0] is not None   # warm: the model has run once
    before = node.wait_diagnostics(all_frames_accounted)

    for index in range(FIRST, FIRST + BURST):   # ~100 Hz, far faster than the model
        node.image_pub.publish(make_image(index))
        time.sleep(0.01)
    burst_end = time.monotonic()
    after = node.wait_diagnostics(lambda v: int(v['frames received']) > int(before['frames received'])
                                  and all_frames_accounted(v))
    semantic.wait_quiet(quiet=2.0)   # the last answer may still be in transit

    def delta(key):
        return int(after[key]) - int(before[key])
    received, processed = delta('frames received'), delta('frames processed')
    dropped = delta('frames dropped')
    answered = [m.header.stamp.sec - 1000 for m in semantic.messages if m.header.stamp.sec - 1000 >= FIRST]
    after_burst = sum(t > burst_end for t in semantic.arrivals)
    summary = f'received {received}, processed {processed}, dropped {dropped}, answered frames {answered}'
    assert received >= BURST // 4, f'only {received} of {BURST} frames arrived; nothing to measure'
    assert processed == len(answered) and processed + dropped == received, summary
    assert dropped > 0, f'every frame of a 100 Hz burst was served: {summary}'
    # After the burst: at most the frame in progress and the newest one (+1 for transport slack).
    assert after_burst <= 3, f'{after_burst} answers after the burst: {summary}'
    assert answered[-1] >= FIRST + BURST - 5, f'the last answer is not for the newest frame: {summary}'
