"""Pictures into video: the Ken Burns camera, the one encoding, the film, masters and timelines.

    framerate.py   frame rates as exact fractions (24, 24000/1001, ...): the `[video] fps` type
    encode.py      VideoEncoding (size, rate, codec, quality, BT.709) and the ffmpeg that writes it
    kenburns.py    one still -> eased zoom/pan frames, sampled once to the video size; a clip
    film.py        the story's film: every scene in order, crossfaded picture to picture
    master.py      clean scene clips with handles, for editing software
    timeline.py    the story as timeline.otio, FCP7 XML and a CMX 3600 EDL (OpenTimelineIO)

Nothing here imports torch: `storyreel animate` starts fast, and settings can import framerate.
"""
