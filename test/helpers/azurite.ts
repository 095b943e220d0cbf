import { afterAll, beforeAll } from 'vitest';
import { startAzurite, type AzuriteInstance } from './azurite-process';

export { AZURITE_ACCOUNT_KEY, AZURITE_ACCOUNT_NAME, startAzurite, type AzuriteInstance } from './azurite-process';

/**
 * One Azurite blob emulator for the test file: started in beforeAll from
 * node_modules on 127.0.0.1 and a free port, killed in afterAll. The getter
 * returns the running instance (connection string, endpoint).
 */
export function useAzurite(): () => AzuriteInstance {
  let instance: AzuriteInstance | undefined;
  beforeAll(async () => {
    instance = await startAzurite();
  });
  afterAll(async () => {
    await instance?.stop();
  });
  return () => {
    if (instance === undefined) throw new Error('Azurite is not running: call useAzurite() at the top level of the test file');
    return instance;
  };
}
