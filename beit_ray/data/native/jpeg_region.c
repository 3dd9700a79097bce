/* Decode one rectangle of a JPEG, optionally at a DCT scale of M/8, with libjpeg(-turbo).
 *
 * The work is proportional to what the crop needs, not to the image:
 *   - rows above the crop are skipped (jpeg_skip_scanlines: entropy-decoded, no IDCT, no colour
 *     conversion), and decoding stops after the crop's last row;
 *   - columns outside the crop (rounded out to whole iMCUs) get no IDCT and no colour
 *     conversion (jpeg_crop_scanline);
 *   - scale_num/8 < 1 runs libjpeg's scaled IDCT (a 5/8 decode computes 5x5 pixels per block).
 * Pixels equal a full decode's at scale 8/8 (same IDCT, same upsampling): a margin of
 * MARGIN pixels is decoded around the crop so the upsampler sees the same neighbours.
 *
 * Returns 0 on success. On any libjpeg error or warning returns non-zero with a message in err:
 * the caller falls back to a full decode (which classifies the failure).
 * Built on first use by beit_ray/data/jpeg.py and loaded with ctypes (no Python C API).
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define MARGIN 16

struct br_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int warnings;
};

static void br_error_exit(j_common_ptr cinfo) {
  struct br_error *e = (struct br_error *)cinfo->err;
  longjmp(e->jump, 1);
}

static void br_emit_message(j_common_ptr cinfo, int level) {
  if (level < 0) ((struct br_error *)cinfo->err)->warnings++;
}

static void br_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* Decode rows [y0, y1) x columns [x0, x1) of the image scaled by scale_num/8 (coordinates in
 * the scaled image) into out: uint8 RGB, (y1 - y0) x (x1 - x0) x 3, row-major. */
int br_jpeg_region(const unsigned char *buf, unsigned long size, int scale_num, int x0, int y0,
                   int x1, int y1, unsigned char *out, char *err, int err_len) {
  struct jpeg_decompress_struct cinfo;
  struct br_error jerr;
  unsigned char *volatile row = NULL; /* set after setjmp, freed after a longjmp */
  cinfo.err = jpeg_std_error(&jerr.pub);
  jerr.pub.error_exit = br_error_exit;
  jerr.pub.emit_message = br_emit_message;
  jerr.pub.output_message = br_output_message;
  jerr.warnings = 0;
  if (setjmp(jerr.jump)) {
    (*cinfo.err->format_message)((j_common_ptr)&cinfo, err);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return 1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, buf, size);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
      cinfo.jpeg_color_space != JCS_RGB) {
    snprintf(err, err_len, "colour space %d: not handled here", (int)cinfo.jpeg_color_space);
    jpeg_destroy_decompress(&cinfo);
    return 2;
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = scale_num;
  cinfo.scale_denom = 8;
  cinfo.dct_method = JDCT_ISLOW;
  jpeg_start_decompress(&cinfo);
  int ow = (int)cinfo.output_width, oh = (int)cinfo.output_height;
  if (x0 < 0 || y0 < 0 || x1 > ow || y1 > oh || x0 >= x1 || y0 >= y1) {
    snprintf(err, err_len, "region %d,%d,%d,%d outside %dx%d", x0, y0, x1, y1, ow, oh);
    jpeg_destroy_decompress(&cinfo);
    return 3;
  }
  /* Columns: decode [xs, xs + cw) (libjpeg widens it to whole iMCUs), keep [x0, x1). */
  JDIMENSION xs = (JDIMENSION)(x0 > MARGIN ? x0 - MARGIN : 0);
  JDIMENSION xe = (JDIMENSION)(x1 + MARGIN < ow ? x1 + MARGIN : ow);
  JDIMENSION cw = xe - xs;
  if (xs > 0 || xe < (JDIMENSION)ow) jpeg_crop_scanline(&cinfo, &xs, &cw);
  row = (unsigned char *)malloc((size_t)cw * 3);
  if (row == NULL) {
    snprintf(err, err_len, "out of memory");
    jpeg_destroy_decompress(&cinfo);
    return 4;
  }
  if (y0 > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
  size_t keep = (size_t)(x1 - x0) * 3, skip = (size_t)(x0 - (int)xs) * 3;
  JSAMPROW rows[1] = {row};
  for (int y = y0; y < y1; y++) {
    if (jpeg_read_scanlines(&cinfo, rows, 1) != 1) {
      snprintf(err, err_len, "short read at row %d", y);
      jpeg_destroy_decompress(&cinfo);
      free(row);
      return 5;
    }
    memcpy(out + (size_t)(y - y0) * keep, row + skip, keep);
  }
  free(row);
  int warnings = jerr.warnings;
  jpeg_abort_decompress(&cinfo); /* the rows below the crop are never decoded */
  jpeg_destroy_decompress(&cinfo);
  if (warnings) {
    snprintf(err, err_len, "%d libjpeg warning(s) (corrupt data)", warnings);
    return 6;
  }
  return 0;
}
