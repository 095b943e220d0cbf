/**
 * Type declarations for the parts of the `lz4` package blockrelay uses (the
 * package ships none). Frame streams compress logs on the process server ->
 * master target hop.
 */
declare module 'lz4' {
  import type { Transform } from 'node:stream';

  interface EncoderOptions {
    blockIndependence?: boolean;
    blockChecksum?: boolean;
    blockMaxSize?: number;
    streamSize?: boolean;
    streamChecksum?: boolean;
    dict?: boolean;
    dictId?: number;
    highCompression?: boolean;
  }

  export function createEncoderStream(options?: EncoderOptions): Transform;
  export function createDecoderStream(options?: { useJS?: boolean }): Transform;
  export function encode(input: Buffer, options?: EncoderOptions): Buffer;
  export function decode(input: Buffer): Buffer;
  export function encodeBound(size: number): number;
  export function encodeBlock(input: Buffer, output: Buffer, startIdx?: number, endIdx?: number): number;
  export function decodeBlock(input: Buffer, output: Buffer, startIdx?: number, endIdx?: number): number;

  const lz4: {
    createEncoderStream: typeof createEncoderStream;
    createDecoderStream: typeof createDecoderStream;
    encode: typeof encode;
    decode: typeof decode;
    encodeBound: typeof encodeBound;
    encodeBlock: typeof encodeBlock;
    decodeBlock: typeof decodeBlock;
  };
  export default lz4;
}
