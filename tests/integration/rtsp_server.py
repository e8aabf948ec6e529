"""A live RTSP server on loopback, for tests, shaped like an IP camera. Run with Debian's
/usr/bin/python3 (where ``gi`` imports):

    /usr/bin/python3 rtsp_server.py PORT [PATH [GOP [interlaced]]] [--option=value ...]

Prints ``READY`` when bound. ``interlaced`` encodes the pictures as interlaced fields, as an
analogue camera's encoder does. Options (all optional; the defaults are an H.264 320x240
30 fps camera without audio or authentication, over TCP or UDP):

``--codec=h264|h265|mjpeg``, ``--width=N``, ``--height=N``, ``--fps=N`` (or ``N/D``),
``--audio=aac|opus`` (a second track), ``--audio-first`` (the audio track is listed first in
the SDP), ``--auth=basic|digest`` with ``--user=U`` and ``--password=P`` (``--auth=both``
offers both), ``--protocols=tcp|udp|tcp,udp`` (transports the server accepts),
``--pattern=NAME`` (videotestsrc's), ``--bitrate=KBITS``.

Needs: gir1.2-gst-rtsp-server-1.0 gir1.2-gstreamer-1.0 python3-gi gstreamer1.0-plugins-base
gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly (x265 and the audio encoders for those
options: gstreamer1.0-plugins-bad).
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

# The historical pipeline (H.264, 320x240 at 30 fps): kept as it was for existing callers.
PIPELINE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 {interlace}"
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate=800 interlaced={interlaced} "
    "! rtph264pay name=pay0 pt=96 config-interval=1 )"
)

VIDEO = (
    "videotestsrc is-live=true pattern={pattern} "
    "! video/x-raw,width={width},height={height},framerate={fps} "
)
ENCODERS = {
    "h264": (
        "{interlace}! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate={bitrate} "
        "interlaced={interlaced} ! rtph264pay name=pay{n} pt=96 config-interval=1 "
    ),
    "h265": (
        "! x265enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate={bitrate} "
        "! rtph265pay name=pay{n} pt=96 config-interval=1 "
    ),
    # RTP/JPEG carries 4:2:0 or 4:2:2 pictures only
    "mjpeg": "! videoconvert ! video/x-raw,format=I420 ! jpegenc quality=70 ! rtpjpegpay name=pay{n} pt=26 ",
}
AUDIO = {
    "aac": (
        "audiotestsrc is-live=true wave=sine ! audio/x-raw,rate=48000,channels=1 ! audioconvert "
        "! voaacenc bitrate=64000 ! rtpmp4apay name=pay{n} pt=97 "
    ),
    "opus": (
        "audiotestsrc is-live=true wave=sine ! audio/x-raw,rate=48000,channels=1 ! audioconvert "
        "! opusenc ! rtpopuspay name=pay{n} pt=97 "
    ),
}


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    positional, options = [], {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            options[name] = value
        else:
            positional.append(arg)
    return positional, options


def launch(gop: int, interlaced: bool, o: dict[str, str]) -> str:
    # fields of consecutive pictures woven into one, as an interlaced camera takes them
    weave = "! interlace field-pattern=1:1 top-field-first=true " if interlaced else ""
    plain = {"codec", "width", "height", "fps", "audio", "audio-first", "pattern", "bitrate"}.isdisjoint(o)
    if plain:
        return PIPELINE.format(gop=gop, interlaced=str(interlaced).lower(), interlace=weave)
    codec = o.get("codec", "h264")
    fps = o.get("fps", "30")
    if "/" not in fps:
        fps += "/1"
    audio = o.get("audio")
    audio_first = "audio-first" in o and audio is not None
    vn, an = (1, 0) if audio_first else (0, 1)
    video = VIDEO.format(
        pattern=o.get("pattern", "ball"), width=o.get("width", "320"), height=o.get("height", "240"), fps=fps
    ) + ENCODERS[codec].format(
        gop=gop, interlaced=str(interlaced).lower(), interlace=weave, bitrate=o.get("bitrate", "800"), n=vn
    )
    parts = [video]
    if audio:
        sound = AUDIO[audio].format(n=an)
        parts = [sound, video] if audio_first else [video, sound]
    return "( " + " ".join(parts) + ")"


def add_auth(
    server: "GstRtspServer.RTSPServer", factory: "GstRtspServer.RTSPMediaFactory", o: dict[str, str]
) -> None:
    method = o["auth"]
    user, password = o.get("user", "user"), o.get("password", "pass")
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
    methods = GstRtsp.RTSPAuthMethod(0)
    if method in ("basic", "both"):
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        methods |= GstRtsp.RTSPAuthMethod.BASIC
    if method in ("digest", "both"):
        auth.add_digest(user, password, token)
        methods |= GstRtsp.RTSPAuthMethod.DIGEST
    auth.set_supported_methods(methods)
    server.set_auth(auth)
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_role_from_structure(
        Gst.Structure.from_string(
            "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
        )[0]
    )
    factory.set_permissions(permissions)


def main() -> None:
    positional, o = parse_args(sys.argv[1:])
    port = int(positional[0])
    path = positional[1] if len(positional) > 1 else "/test"
    gop = int(positional[2]) if len(positional) > 2 else 15  # frames from one keyframe to the next
    interlaced = len(positional) > 3 and positional[3] == "interlaced"
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch(gop, interlaced, o))
    factory.set_shared(True)  # one encoder for all clients, like a camera
    if "protocols" in o:
        flags = GstRtsp.RTSPLowerTrans(0)
        for name in o["protocols"].split(","):
            flags |= {"tcp": GstRtsp.RTSPLowerTrans.TCP, "udp": GstRtsp.RTSPLowerTrans.UDP}[name]
        factory.set_protocols(flags)
    if o.get("auth"):
        add_auth(server, factory, o)
    server.get_mount_points().add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot bind 127.0.0.1:{port}", file=sys.stderr, flush=True)
        sys.exit(2)
    print("READY", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
