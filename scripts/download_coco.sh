#!/usr/bin/env bash
# Download and unpack the COCO training images (train2014 by default, the set Johnson et al. 2016 trained on).
#
#   scripts/download_coco.sh                      # -> data/coco/train2014/ (82,783 JPEGs, 13.5 GB zip)
#   scripts/download_coco.sh --year 2017          # -> data/coco/train2017/ (118,287 JPEGs, 19.3 GB zip)
#   scripts/download_coco.sh --dest /big/disk --dry-run
#
# Resumable: an interrupted download continues where it stopped (curl -C -, or wget -c). The archive is checked
# against its known size and MD5 (published alongside the COCO zips and used by many loaders) before it is
# unpacked; unzip checks each member's CRC while extracting. Unpacking goes into a temporary folder that is renamed
# only when complete, so a half-unpacked folder never looks like a dataset. Run it again after a failure.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/download_coco.sh [--year 2014|2017] [--dest DIR] [--keep-zip] [--skip-md5] [--dry-run] [--help]

Download the COCO training images from images.cocodataset.org and unpack them for faststyle's train.py.

  --year 2014|2017  which training set (default 2014: train2014.zip, 13.5 GB, 82,783 images;
                    2017: train2017.zip, 19.3 GB, 118,287 images)
  --dest DIR        where to put the zip and the unpacked folder (default data/coco)
  --keep-zip        keep the zip after unpacking (default: delete it once the images are in place)
  --skip-md5        check only the size of the zip, not its MD5 (the MD5 pass reads 13-19 GB once)
  --mirror URL      base URL to fetch <URL>/train<year>.zip from instead of http://images.cocodataset.org/zips
  --dry-run         print what would be done and the train.py command; download and write nothing
  -h, --help        show this help

Needs curl or wget, unzip, and about 2.2x the zip size of free disk while unpacking (zip + images).
EOF
}

die() {
    echo "error: $*" >&2
    exit 2
}

# True when option $1 was given a value ($2 present, non-empty, not another --option).
has_value() {
    [[ $1 -ge 2 && -n "$2" && "$2" != --* ]]
}

year=2014
dest=data/coco
keep_zip=0
skip_md5=0
dry_run=0
mirror=http://images.cocodataset.org/zips

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --year)
            has_value $# "${2:-}" || die "--year needs a value: 2014 or 2017"
            year="$2"
            shift 2
            ;;
        --year=*)
            year="${1#--year=}"
            shift
            ;;
        --dest)
            has_value $# "${2:-}" || die "--dest needs a folder, e.g. --dest data/coco"
            dest="$2"
            shift 2
            ;;
        --dest=*)
            dest="${1#--dest=}"
            [[ -n "$dest" ]] || die "--dest needs a folder, e.g. --dest data/coco"
            shift
            ;;
        --keep-zip)
            keep_zip=1
            shift
            ;;
        --skip-md5)
            skip_md5=1
            shift
            ;;
        --dry-run)
            dry_run=1
            shift
            ;;
        --mirror)
            has_value $# "${2:-}" || die "--mirror needs a base URL"
            mirror="${2%/}"
            shift 2
            ;;
        *)
            die "unknown argument '$1' (see scripts/download_coco.sh --help)"
            ;;
    esac
done

# Known facts about the official archives: size in bytes, MD5, number of images inside.
case "$year" in
    2014)
        expected_bytes=13510573713
        expected_md5=0da8c0bd3d6becc4dcb32757491aca88
        expected_images=82783
        ;;
    2017)
        expected_bytes=19336861798
        expected_md5=cced6f7f71b7629ddf16f17bbcfab6b2
        expected_images=118287
        ;;
    *)
        die "--year must be 2014 or 2017, got '$year'"
        ;;
esac

# Tests run the real download/check/unpack path on a tiny archive: they replace the facts above with
# FASTSTYLE_COCO_TEST_FACTS="<bytes> <md5> <images>" (never set this for a real download).
if [[ -n "${FASTSTYLE_COCO_TEST_FACTS:-}" ]]; then
    read -r expected_bytes expected_md5 expected_images <<<"$FASTSTYLE_COCO_TEST_FACTS"
fi

name="train${year}"
url="${mirror}/${name}.zip"
zip_path="${dest}/${name}.zip"
part_path="${zip_path}.part"
images_dir="${dest}/${name}"
train_cmd="python train.py style=data/samples/styles/van_gogh_village_street_auvers.jpg data.root=${images_dir}"

count_images() {
    find "$1" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) | wc -l | tr -d ' '
}

if [[ $dry_run -eq 1 ]]; then
    echo "dry run: nothing is downloaded or written"
    echo "would download   ${url}"
    echo "             to  ${part_path} (resumable), renamed to ${zip_path} when complete"
    echo "would check      size ${expected_bytes} bytes$([[ $skip_md5 -eq 1 ]] || echo ", md5 ${expected_md5}")"
    echo "would unpack to  ${images_dir}/ (${expected_images} images)"
    [[ $keep_zip -eq 1 ]] && echo "would keep       ${zip_path}" || echo "would delete     ${zip_path} after unpacking"
    echo "then train with: ${train_cmd}"
    exit 0
fi

if [[ -d "$images_dir" ]]; then
    found=$(count_images "$images_dir")
    if [[ "$found" -eq "$expected_images" ]]; then
        echo "${images_dir} already holds ${found} images: nothing to do"
        echo "train with: ${train_cmd}"
        exit 0
    fi
    die "${images_dir} exists but holds ${found} images instead of ${expected_images}: move it away and run again"
fi

command -v unzip >/dev/null || die "unzip is not installed (e.g. apt-get install unzip)"
mkdir -p "$dest"

file_size() {
    stat -c %s "$1" 2>/dev/null || stat -f %z "$1"
}

if [[ ! -f "$zip_path" ]]; then
    echo "downloading ${url} -> ${part_path} (${expected_bytes} bytes; resumes if interrupted)"
    if command -v curl >/dev/null; then
        curl --fail --location --retry 5 --continue-at - --output "$part_path" "$url" ||
            die "download failed: run the script again to resume"
    elif command -v wget >/dev/null; then
        wget --continue --tries=5 --output-document="$part_path" "$url" ||
            die "download failed: run the script again to resume"
    else
        die "neither curl nor wget is installed"
    fi
    got=$(file_size "$part_path")
    if [[ "$got" -ne "$expected_bytes" ]]; then
        [[ "$got" -gt "$expected_bytes" ]] && die "${part_path} is ${got} bytes, more than the expected ${expected_bytes}: delete it and run again"
        die "${part_path} is ${got} of ${expected_bytes} bytes: run the script again to resume"
    fi
    mv "$part_path" "$zip_path"
fi

got=$(file_size "$zip_path")
[[ "$got" -eq "$expected_bytes" ]] || die "${zip_path} is ${got} bytes, expected ${expected_bytes}: delete it and run again"
if [[ $skip_md5 -eq 0 ]]; then
    if command -v md5sum >/dev/null; then
        echo "checking md5 of ${zip_path} (reads the whole file once)"
        sum=$(md5sum "$zip_path" | cut -d' ' -f1)
    elif command -v md5 >/dev/null; then
        sum=$(md5 -q "$zip_path")
    else
        die "no md5sum or md5 command: install coreutils or pass --skip-md5"
    fi
    [[ "$sum" == "$expected_md5" ]] || die "${zip_path} has md5 ${sum}, expected ${expected_md5}: delete it and run again"
fi

tmp_dir="${dest}/.${name}.unpacking"
rm -rf "$tmp_dir"
mkdir -p "$tmp_dir"
echo "unpacking ${zip_path} -> ${images_dir}/"
unzip -q "$zip_path" -d "$tmp_dir" || die "unzip failed (corrupt archive?): delete ${zip_path} and run again"
[[ -d "${tmp_dir}/${name}" ]] || die "the archive did not contain a ${name}/ folder"
found=$(count_images "${tmp_dir}/${name}")
[[ "$found" -eq "$expected_images" ]] || die "unpacked ${found} images, expected ${expected_images}"
mv "${tmp_dir}/${name}" "$images_dir"
rmdir "$tmp_dir"
[[ $keep_zip -eq 1 ]] || rm -f "$zip_path"

echo "done: ${found} images in ${images_dir}"
echo "optional, faster epochs: python scripts/prepare_dataset.py ${images_dir} ${images_dir}_256 --short-side 256"
echo "train with: ${train_cmd}"
