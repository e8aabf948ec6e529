"""A live H.264 RTSP server on loopback, for tests. Run with Debian's /usr/bin/python3 (where
``gi`` imports): ``/usr/bin/python3 rtsp_server.py PORT [PATH [GOP [interlaced]]]``. Prints ``READY``
when bound. ``interlaced`` encodes the pictures as interlaced fields, as an analogue camera's
encoder does.

Needs: gir1.2-gst-rtsp-server-1.0 gir1.2-gstreamer-1.0 python3-gi gstreamer1.0-plugins-base
gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 {interlace}"
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate=800 interlaced={interlaced} "
    "! rtph264pay name=pay0 pt=96 config-interval=1 )"
)


def main() -> None:
    port = int(sys.argv[1])
    path = sys.argv[2] if len(sys.argv) > 2 else "/test"
    gop = int(sys.argv[3]) if len(sys.argv) > 3 else 15  # frames from one keyframe to the next
    interlaced = "true" if len(sys.argv) > 4 and sys.argv[4] == "interlaced" else "false"
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    # fields of consecutive pictures woven into one, as an interlaced camera takes them
    weave = "! interlace field-pattern=1:1 top-field-first=true " if interlaced == "true" else ""
    factory.set_launch(PIPELINE.format(gop=gop, interlaced=interlaced, interlace=weave))
    factory.set_shared(True)  # one encoder for all clients, like a camera
    server.get_mount_points().add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot bind 127.0.0.1:{port}", file=sys.stderr, flush=True)
        sys.exit(2)
    print("READY", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
